"""Compiles the data plane (dispatcher/proxy.py, typed by dispatcher/proxy.pxd) with Cython.

Everything else is in pyproject.toml. The module is plain Python too: where Cython or a C compiler is
missing, or the build fails, it is installed and imported as it is, only slower (`ctops bench proxy`
says which ran). `make` rebuilds it in place when the source changes.
"""

import json
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "dispatcher"))
from planebuild import RECORD, source_sha256

HERE = Path(__file__).resolve().parent


class RecordingBuildExt(build_ext):
    """Writes, next to each compiled data plane, the hash of the sources it was compiled from, so a
    stale build is found (dispatcher/planebuild.py) instead of silently running old code."""

    def run(self) -> None:
        super().run()
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            # an optional build that failed leaves an older module behind: that one gets no record
            newest_source = max((HERE / "dispatcher" / n).stat().st_mtime for n in ("proxy.py", "proxy.pxd"))
            if built.exists() and built.stat().st_mtime >= newest_source:
                record = {"source_sha256": source_sha256(HERE / "dispatcher"), "module": built.name}
                (built.parent / RECORD).write_text(json.dumps(record) + "\n")


try:
    from Cython.Build import cythonize
except ImportError:
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("dispatcher.proxy", ["dispatcher/proxy.py"], optional=True)],
        compiler_directives={"language_level": 3, "annotation_typing": False},  # the .pxd types, not hints
        quiet=True)

setup(ext_modules=ext_modules, cmdclass={"build_ext": RecordingBuildExt})
