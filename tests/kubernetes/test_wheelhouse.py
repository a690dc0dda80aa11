"""kubernetes/wheelhouse.py: requirements evaluated for the image's Python."""

import zipfile

from tests.kubernetes.conftest import load_script

wheelhouse = load_script("wheelhouse")


def _wheel(directory, name, version, requires):
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def _env(full_version):
    return {"python_full_version": full_version, "python_version": full_version.rsplit(".", 1)[0]}


def test_markers_of_the_target_python_decide(tmp_path):
    _wheel(tmp_path, "parm", "0.1.0", ["redis>=5", 'onnxruntime>=1.18; extra == "cpu"',
                                       'torch==2.13.0; extra == "train"'])
    _wheel(tmp_path, "redis", "8.1.0", ['async-timeout>=4.0.3; python_full_version < "3.11.3"'])
    _wheel(tmp_path, "onnxruntime", "1.32.0", ["numpy>=1.21"])
    _wheel(tmp_path, "numpy", "2.4.6", [])
    env = dict(wheelhouse.default_environment())
    missing = wheelhouse.missing(tmp_path, dict(env, **_env("3.11.2")), [("parm", {"cpu"})])
    assert [str(r) for r in missing] == ['async-timeout>=4.0.3; python_full_version < "3.11.3"']
    assert wheelhouse.missing(tmp_path, dict(env, **_env("3.11.7")), [("parm", {"cpu"})]) == []


def test_a_version_that_does_not_satisfy_is_missing_and_not_followed(tmp_path):
    _wheel(tmp_path, "parm", "0.1.0", ["numpy>=3"])
    _wheel(tmp_path, "numpy", "2.4.6", ["notthere"])
    env = dict(wheelhouse.default_environment(), **_env("3.11.2"))
    assert [str(r) for r in wheelhouse.missing(tmp_path, env, [("parm", set())])] == ["numpy>=3"]
