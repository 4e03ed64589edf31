"""The optional native kernels of proof of GPU (src/gpuprovider/proof/_native.c): built
by `pip install` with the system's C compiler and no download; when the build fails the
package installs without them and proofs run on numpy (`native.available()` says which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gpuprovider.proof._native",
            ["src/gpuprovider/proof/_native.c"],
            extra_compile_args=["-O3", "-fno-strict-aliasing"],
            optional=True,
        ),
        # the walk state's Merkle root on libcrypto (OpenSSL's headers needed to build;
        # without them hashlib computes it)
        Extension(
            "gpuprovider.proof._merkle",
            ["src/gpuprovider/proof/_merkle.c"],
            extra_compile_args=["-O2"],
            libraries=["crypto"],
            optional=True,
        ),
    ]
)
