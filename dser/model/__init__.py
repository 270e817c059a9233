"""The SER model: a ``transformers`` speech encoder (``backbones/``, one module per front-end
family), parameter-efficient adaptors (``adaptors/``), and a pooling + classifier/regressor head
(``head``), put together by ``build``.

This package never imports ``deepspeed``: the recipes (``dser/train.py`` …) wrap the model.
"""
