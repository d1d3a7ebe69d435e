"""The package version: one place, read by setup.py and protokernels.__version__. Every
distribution of a release (protokernels, protokernels-cu12, protokernels-cu13) carries it as is,
without a local "+cu13" part, so that a package index accepts the wheels."""
__version__ = "0.2.0"
