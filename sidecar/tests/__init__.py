"""The test suite. A package, so that pytest imports every module here once, by its
``sidecar.tests.`` name, and test modules share code through ``sidecar.tests.helpers``."""
