"""Guards of the repository layout."""

import platform as std_platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_platform_folder_has_no_init():
    # platform/__init__.py would make `platform` a package that shadows the standard library
    # module, breaking pytest, Ray and torch at import.
    assert not (REPO / "platform" / "__init__.py").exists()


def test_standard_platform_module_is_not_shadowed():
    assert hasattr(std_platform, "python_version"), std_platform.__file__
    assert "site-packages" not in str(std_platform.__file__)
    assert not str(std_platform.__file__).startswith(str(REPO))


def test_library_is_importable_from_platform_folder():
    import alloylm

    assert Path(alloylm.__file__).resolve().parent == REPO / "platform" / "alloylm"
