"""Root conftest: its presence puts ``tests/`` on ``sys.path`` (pytest's rootdir-relative
conftest import), so tests import the shared writers as plain modules::

    from fixtures_corpora import write_ravdess        # corpus trees in published layouts
    from fixtures_shards import write_test_shards     # shards in the ``dser shard`` format
"""
