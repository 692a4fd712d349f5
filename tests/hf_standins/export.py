"""Project-authored stand-in for transformers' `tests/exporters/test_export.py` (not shipped in the sdist).

`ModelTesterMixin` inherits `ExportTesterMixin`; upstream it adds `torch.export` tests that rely on transformers'
internal exporter test utilities. The project tests export its own way (tests of the Hub export), so this mixin is
intentionally empty.
"""


class ExportTesterMixin:
    pass
