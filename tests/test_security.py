"""Nothing in raydseg unpickles (a checkpoint or table from a shared bucket could run code), and user-given names
cannot place files outside the output root."""
import ast
from pathlib import Path

import pytest

from raydseg.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def unpickling_calls(source: str) -> list[str]:
    """`line: call` for every call that may unpickle: torch.load without weights_only=True, pickle/cloudpickle/
    joblib/dill load(s), numpy load with allow_pickle=True, pandas read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        last = name.rsplit(".", 1)[-1]
        bad = (name.endswith("torch.load") and kw.get("weights_only") != "True"
               or name.split(".")[0] in ("pickle", "cloudpickle", "joblib", "dill", "_pickle") and last in
               ("load", "loads", "Unpickler")
               or last == "load" and name.split(".")[0] in ("np", "numpy") and kw.get("allow_pickle") == "True"
               or last == "read_pickle")
        if bad:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_every_kind_of_unpickling():
    src = ("torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n"
           "pd.read_pickle(p)\ncloudpickle.load(f)\ntorch.load(f, weights_only=True)\nnp.load(f)\n")
    assert [line.split(":")[0] for line in unpickling_calls(src)] == ["1", "2", "3", "4", "5", "6"]


def test_no_unpickling_anywhere_in_the_package_or_jobs():
    files = sorted([*(REPO / "raydseg").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])
    assert len(files) > 50
    found = {str(f.relative_to(REPO)): calls for f in files if (calls := unpickling_calls(f.read_text()))}
    assert found == {}


@pytest.mark.parametrize("override, line", [
    ("run.name=../up", "run.name: string should match pattern"),
    ("run.name=/abs", "run.name: string should match pattern"),
    ("eval.sets=../x:cityscapes:/data", "eval.sets: eval set name '../x' must be letters, digits, '.', '_' or '-'"),
    ("eval.sets=a/b:cityscapes:/data", "eval.sets: eval set name 'a/b' must be letters, digits, '.', '_' or '-'"),
])
def test_names_cannot_escape_the_output_root(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert e.value.problems[0].startswith(line)
