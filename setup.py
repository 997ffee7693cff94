"""Maps the root folders (schema/, compiler/, ...) to the `surogate.*` import names.

The design keeps the pipeline visible at the repository root, but `schema`, `compiler` and `runtime`
are taken on the package index, so each folder installs under `surogate.`.
"""

from setuptools import find_packages, setup

ROOTS = {
    "surogate": "surogate",
    "surogate.schema": "schema",
    "surogate.compiler": "compiler",
    "surogate.runtime": "runtime",
    "surogate.numba_kernels": "numba_kernels",
}

packages = []
for package, folder in ROOTS.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS, package_data={"surogate.schema": ["*.json"]})
