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


def test_lazy_package_names_are_the_objects_not_submodules_of_the_same_name():
    """`from alloylm.merge import materialize` once returned the submodule `materialize` (imported
    first by another module) instead of its function, and the quickstart's merge failed."""
    import importlib
    import pkgutil
    import types

    for package in ("alloylm.merge", "alloylm.evaluate"):
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"{package}.{info.name}")  # every submodule imported first
        for name in module._LAZY:
            assert not isinstance(getattr(module, name), types.ModuleType), f"{package}.{name} is a module"
