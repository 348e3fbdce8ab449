"""``sdft serve``: the local backend behind Tinker's own HTTP protocol.

A stock ``tinker.ServiceClient(base_url="http://127.0.0.1:PORT", api_key=...)`` of
``tinker==0.38`` drives it unmodified. Modules, one concept each:

- :mod:`sdft.serve.app`: the Starlette routes (``/api/v1/...``) and :class:`ServeConfig`
- :mod:`sdft.serve.codec`: protobuf / zstd / JSON request and result encodings
- :mod:`sdft.serve.futures`: pending results and ``retrieve_future`` long-polling
- :mod:`sdft.serve.sessions`: sessions, training models and sampling sessions
- :mod:`sdft.serve.checkpoints`: ``tinker://`` paths on the checkpoint root
- :mod:`sdft.serve.auth`: the API key and the check every request passes
- :mod:`sdft.serve.errors`: the statuses and messages the SDK shows its user
- :mod:`sdft.serve.cli`: ``sdft serve`` / ``python -m sdft.serve``

Importing this package imports neither torch nor starlette.
"""
