"""Compiles the data plane (dispatcher/proxy.py, typed by dispatcher/proxy.pxd) with Cython.

Everything else is in pyproject.toml. The module is plain Python too: where Cython or a C compiler is
missing, or the build fails, it is installed and imported as it is, only slower (`ctops bench proxy`
says which ran). `make` rebuilds it in place when the source changes.
"""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("dispatcher.proxy", ["dispatcher/proxy.py"], optional=True)],
        compiler_directives={"language_level": 3, "annotation_typing": False},  # the .pxd types, not hints
        quiet=True)

setup(ext_modules=ext_modules)
