"""Quality metrics that need no downloaded network (SCIENCE.md section 7), plus standard FID.

Modules (all batched torch, CPU or GPU; statistics in float64):

- ``swd``: sliced Wasserstein distance on Laplacian-pyramid 7x7 patches (Karras et al. 2018),
  per level and averaged (x1e3). Pyramid: 5-tap binomial blur, zero-insertion expand (the
  paper's; ``components.scale``'s gaussian pyramid expands bilinearly, so it is not reused).
- ``spectral``: log-RAPSD distance (mean |d(f)|, RMS, per frequency) and the difference of the
  fitted spectral slopes, on luminance, through ``components.spectra``.
- ``frechet``: Frechet distance with an eigendecomposition-based trace of the matrix root.
- ``kid``: unbiased MMD^2 with the cubic kernel over subsets (mean, std).
- ``prd``: improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019).
- ``memorization``: nearest / second-nearest training distance ratio (flag below 1/3).
- ``feature_net``: prism's in-house classifier (ResNet-9 layout) whose penultimate features,
  calibrated to unit mean square on its training images, define ``FD-prism-<sha256[:8]>``.
- ``inception``: the FID InceptionV3 graph, loaded only from a user-supplied
  ``pt_inception-2015-12-05`` state dict; without it standard FID is "unavailable".

The evaluate stage (``pipelines.evaluation.evaluate``, ``prism eval run``) combines them;
real-vs-real floors come from ``benchmarks/metric_floors.py``.
"""
