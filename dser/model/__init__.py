"""The SER model: a ``transformers`` speech encoder (``backbone``), parameter-efficient adaptors
(``adaptors/``), and a pooling + classifier/regressor head (``head``), put together by ``build``.

This package never imports ``deepspeed``: the recipes (``dser/train.py`` …) wrap the model.
"""
