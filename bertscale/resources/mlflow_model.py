"""The code MLflow runs to load a bertscale model (MLflow's models-from-code: no pickled object is stored with
the model). The model's `code/` folder holds the bertscale package, so this runs where bertscale is not
installed."""

from bertscale.serving import declare_model

declare_model()
