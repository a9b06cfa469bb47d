"""scripts/plant_bugs.py stays runnable: each bug it plants replaces a line the code still holds exactly once, with a
different line, and names a test that exists. (Running the planted copies takes about a minute: run the script.)"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("plant_bugs", ROOT / "scripts" / "plant_bugs.py")
plant_bugs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plant_bugs)


@pytest.mark.parametrize("bug", plant_bugs.BUGS, ids=[b[0] for b in plant_bugs.BUGS])
def test_each_planted_line_is_in_the_code_once_and_its_test_exists(bug):
    _, file, correct, planted, test = bug
    assert correct != planted
    assert (ROOT / file).read_text().count(correct) == 1
    test_file, test_name = test.split("::")
    assert f"def {test_name}(" in (ROOT / test_file).read_text()
