"""The served sampler: a Ray Serve application with a FastAPI ingress.

    prism serve --model models:/prism-debug@champion        # or a model directory; Ctrl-C stops
    prism serve --model DIR --detach && prism serve --stop  # for scripts
    prism serve --model DIR --direct-ingress --ingress-replicas 4   # no proxy: faster
    open http://127.0.0.1:8000/docs                          # the OpenAPI page
    curl -s localhost:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"seed": 1, "steps": 32, "format": "png"}' -o one.png
    prism sample --url http://127.0.0.1:8000 --n 4 --seed 0 --out samples/
    prism sample --local --model DIR --n 4 --resolution 64 --out samples/   # no server

Modules: ``schemas`` (request/response models), ``app`` (routes only), ``model`` (the
``Sampler`` deployment: loads and delegates), ``service`` (its work, no Ray), ``jobs`` (a
request as a job: checks, caps, parts), ``loading`` (registry references, the model cache),
``memory`` (device memory estimates), ``merging`` (one device call of everything waiting),
``diagnostics`` (timing inside a replica), ``encode`` (PNG), ``direct`` (the Ingress replicas
on one shared port), ``launch`` (start/stop from ``config.yaml``), ``serve_logs`` (a benign
Ray Serve warning left out of what the service prints), ``cli`` (the two commands).
"""
