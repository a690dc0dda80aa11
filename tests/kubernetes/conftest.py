"""Helpers shared by the Kubernetes tests: the render module (a script in
kubernetes/, not an installed package)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"parm_k8s_{name}", ROOT / "kubernetes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render():
    return load_script("render")
