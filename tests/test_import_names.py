"""No import name of ours shadows a package of the ecosystem, from the repository root or from elsewhere.

``python -m pytest`` and ``python -c`` put the working directory first on ``sys.path``: a top-level folder of
the checkout with an ``__init__.py`` wins over any installed package of the same name. The one that bit was
``kernels/`` (Hugging Face's ``kernels``, which transformers' hub-kernels integration imports).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_only_top_level_package_of_the_checkout_is_streamt1_engine():
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    modules = sorted(p.name for p in REPO.glob("*.py") if p.name != "setup.py")
    assert (packages, modules) == (["streamt1_engine"], [])


def test_kernel_ops_import_as_part_of_streamt1_engine():
    import streamt1_engine.kernels as kernels
    from streamt1_engine.kernels import paged_attention, qk_norm_rope, residual_norm, sink_merge

    for op in (paged_attention, qk_norm_rope, residual_norm, sink_merge):
        assert op.__name__.startswith("streamt1_engine.kernels.")
        assert Path(op.__file__).parent.parent == Path(kernels.__path__[-1])


def _import_in(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_kernels_is_hugging_faces_package(where, tmp_path):
    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("kernels").origin is None:
        pytest.skip("Hugging Face's kernels is not installed (transformers >= 5.25 installs it)")
    cwd = REPO if where == "root" else tmp_path
    out = _import_in(cwd, "import kernels, streamt1_engine.kernels.sink_merge; "
                          "print(kernels.__file__, hasattr(kernels, 'get_kernel'))")
    assert out.returncode == 0, out.stderr
    origin, has_hub_api = out.stdout.split()
    assert REPO / "kernels" not in Path(origin).resolve().parents, origin
    assert has_hub_api == "True"


def test_transformers_hub_kernels_and_the_wan_vae_import_from_the_root():
    # in this process (pytest from the root; skipped by conftest without the wan extra) and in a fresh
    # interpreter started in the root
    import transformers.integrations.hub_kernels  # noqa: F401
    from diffusers import AutoencoderKLWan  # noqa: F401

    out = _import_in(REPO, "import transformers.integrations.hub_kernels; from diffusers import AutoencoderKLWan")
    assert out.returncode == 0, out.stderr
