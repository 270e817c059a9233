"""The SER model: a ``transformers`` speech encoder (``backbones/``, one module per front-end
family), parameter-efficient adaptors (``adaptors/``), and a pooling + classifier/regressor head
(``head``), put together by ``build``; ``checkpoint_io`` saves, loads and exports it.

Its config sections are in ``config`` (``ModelConfig``, ``BackboneConfig``, ``HeadConfig``) and
``adaptors/configs.py``, which import no torch: checking a run config never loads torch,
transformers or peft. The adaptor registry (``adaptors/__init__.py``) is as cheap; each adaptor's
code is imported when a model applies it.

This package never imports ``deepspeed``: the recipes (``dser/train.py`` …) wrap the model.
"""
