"""The ``prism`` sub-commands of the data, science, evaluation, pipeline and experiment parts."""
