"""Which image a command works on: -i, QCOW2_IMAGE, IMAGE_PATH (path or glob), the guide's
default glob ./debian-hurd-amd64-*.qcow2, then ./debian-hurd-amd64.qcow2."""

from __future__ import annotations

import json
from pathlib import Path

from qsnap_testlib import make_image, one_error_line, qsnap_main, run_guide, run_qsnap


def listed_image(out: str) -> str:
    return str(json.loads(out)["image"])


def test_dash_i_wins_over_every_variable(tmp_path: Path) -> None:
    chosen = make_image(tmp_path, name="chosen.qcow2")
    other = make_image(tmp_path, name="other.qcow2")
    make_image(tmp_path, name="debian-hurd-amd64-20250101.qcow2")
    env = {"QCOW2_IMAGE": str(other), "IMAGE_PATH": str(other)}
    rc, out, err = qsnap_main(["-i", chosen, "list", "--json"], environ=env, cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(chosen)
    # -i after the subcommand works too.
    rc, out, err = qsnap_main(["list", "--json", "-i", chosen], environ=env, cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(chosen)


def test_qcow2_image_wins_over_image_path(tmp_path: Path) -> None:
    a = make_image(tmp_path, name="a.qcow2")
    b = make_image(tmp_path, name="b.qcow2")
    rc, out, err = qsnap_main(["list", "--json"], environ={"QCOW2_IMAGE": str(a), "IMAGE_PATH": str(b)},
                              cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(a)


def test_image_path_as_a_path(tmp_path: Path) -> None:
    image = make_image(tmp_path, name="my-hurd-image.qcow2")
    rc, out, err = run_qsnap("list", "--json", env={"IMAGE_PATH": str(image)}, cwd="/")
    assert rc == 0, err
    assert listed_image(out) == str(image)


def test_image_path_as_a_glob(tmp_path: Path) -> None:
    image = make_image(tmp_path, name="vm-2025-11.qcow2")
    (tmp_path / "notes.txt").write_text("not an image")
    rc, out, err = qsnap_main(["list", "--json"], environ={"IMAGE_PATH": str(tmp_path / "vm-*.qcow2")})
    assert rc == 0, err
    assert listed_image(out) == str(image)
    # A relative glob is relative to the working directory.
    rc, out, err = qsnap_main(["list", "--json"], environ={"IMAGE_PATH": "./vm-*.qcow2"}, cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(image)


def test_default_glob_in_the_working_directory(tmp_path: Path) -> None:
    image = make_image(tmp_path, name="debian-hurd-amd64-20251107.qcow2")
    make_image(tmp_path, name="unrelated.qcow2")
    rc, out, err = run_qsnap("list", "--json", cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(image)


def test_default_glob_wins_over_the_plain_default_name(tmp_path: Path) -> None:
    dated = make_image(tmp_path, name="debian-hurd-amd64-20251107.qcow2")
    make_image(tmp_path, name="debian-hurd-amd64.qcow2")
    rc, out, err = qsnap_main(["list", "--json"], cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(dated)


def test_plain_default_name_when_the_glob_matches_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path, name="debian-hurd-amd64.qcow2")
    rc, out, err = run_qsnap("list", "--json", cwd=tmp_path)
    assert rc == 0, err
    assert listed_image(out) == str(image)


def test_guide_cli_uses_the_same_image_rules(tmp_path: Path) -> None:
    make_image(tmp_path, name="debian-hurd-amd64-20251107.qcow2", snapshots=["initial-setup"])
    rc, out, err = run_guide("list", cwd=tmp_path)
    assert rc == 0, err
    assert out.splitlines()[0] == "Snapshots in: debian-hurd-amd64-20251107.qcow2"


def test_no_image_found_names_what_was_searched(tmp_path: Path) -> None:
    rc, _, err = run_qsnap("list", cwd=tmp_path)
    assert rc == 7
    line = one_error_line(err)
    assert "debian-hurd-amd64-*.qcow2" in line
    assert "debian-hurd-amd64.qcow2" in line


def test_missing_qcow2_image_variable_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    for var in ("QCOW2_IMAGE", "IMAGE_PATH"):
        rc, _, err = qsnap_main(["list"], environ={var: str(missing)}, cwd=tmp_path)
        assert rc == 7
        line = one_error_line(err)
        assert str(missing) in line and var in line


def test_image_path_glob_matching_nothing_names_the_glob(tmp_path: Path) -> None:
    pattern = str(tmp_path / "none-*.qcow2")
    rc, _, err = qsnap_main(["list"], environ={"IMAGE_PATH": pattern})
    assert rc == 7
    assert pattern in one_error_line(err)


def test_several_matches_are_refused_and_listed(tmp_path: Path) -> None:
    first = make_image(tmp_path, name="debian-hurd-amd64-20250101.qcow2", snapshots=["A"])
    second = make_image(tmp_path, name="debian-hurd-amd64-20250202.qcow2", snapshots=["A"])
    before = (first.read_bytes(), second.read_bytes())
    rc, _, err = run_qsnap("create", "B", cwd=tmp_path)
    assert rc == 2
    line = one_error_line(err)
    assert str(first) in line and str(second) in line
    assert (first.read_bytes(), second.read_bytes()) == before
    rc, _, err = qsnap_main(["list"], environ={"IMAGE_PATH": str(tmp_path / "*.qcow2")})
    assert rc == 2
    line = one_error_line(err)
    assert first.name in line and second.name in line
