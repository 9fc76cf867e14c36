"""bertscale: pretrain and fine-tune BERT, from raw text to a registered, evaluated model."""

__version__ = "0.1.0"
