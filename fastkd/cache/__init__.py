"""``python -m fastkd.cache``: teacher outputs to disk — ``format`` (records, manifest, checks), ``build``
(resumable, sharded, atomic), ``verify`` (re-run the teacher on random records), ``__main__`` (the CLI).
``fastkd.teachers.cached`` reads what ``build`` writes. Import the submodules (this package imports
nothing, so the reader can import ``cache.format`` without the builder)."""
