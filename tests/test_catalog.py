"""The template catalog: problem reporting for bad files, and `lsl_apply` against the database."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from jsonschema import Draft202012Validator

from accounts.services import create_team
from environments import catalog
from environments.models import Environment, Template

REPO = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "catalog_bad"

# Each bad fixture file and the exact problems it must produce, as "LINE:COL: path: message".
BAD_FILES: dict[str, list[str]] = {
    "yaml_syntax.yaml": ["4:18: (yaml): mapping values are not allowed here"],
    "empty.yaml": ["1:1: (root): expected a mapping, got null"],
    "version_wrong.yaml": ["1:10: version: must be 1, got integer 2"],
    "unknown_top_key.yaml": ["3:1: defaults: unknown key 'defaults'"],
    "templates_not_list.yaml": ["3:3: templates: expected a list, got a mapping"],
    "unknown_template_key.yaml": ["5:5: templates[0].allow_sudo: unknown key 'allow_sudo'"],
    "unknown_resource_key.yaml": [
        "7:7: templates[0].resources.memroy: unknown key 'memroy' (did you mean 'memory'?)"
    ],
    "missing_image.yaml": ["3:5: templates[0]: missing required key 'image'"],
    "bad_slug.yaml": [
        "3:11: templates[0].slug: 'Debian_12' is not a valid slug "
        "(lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters)"
    ],
    "duplicate_slug.yaml": ["7:11: templates[2].slug: duplicate slug 'debian' (first at line 3)"],
    "duplicate_key.yaml": ["6:5: templates[0].image: duplicate key 'image' (first at line 4)"],
    "bad_image.yaml": ["4:12: templates[0].image: 'registry..example/x' is not a valid image reference"],
    "cpus_type.yaml": ["6:13: templates[0].resources.cpus: expected a number, got string 'two'"],
    "cpus_range.yaml": ["5:23: templates[0].resources.cpus: must be >= 0.1"],
    "memory_format.yaml": [
        "6:15: templates[0].resources.memory: 'lots' is not a valid memory size "
        "(use e.g. 512m, 2g, or an integer number of MiB)"
    ],
    "memory_range.yaml": ["6:15: templates[0].resources.memory: '300g' is out of range (16m to 256g)"],
    "pids_range.yaml": ["6:13: templates[0].resources.pids: must be <= 65536"],
    "network_mode.yaml": ["6:23: templates[0].network.modes[1]: 'bridged' is not one of: bridge, host, none"],
    "network_modes_repeated.yaml": ["6:29: templates[0].network.modes[2]: 'bridge' is listed more than once"],
    "mount_relative.yaml": [
        "7:17: templates[0].mounts[0].target: 'data' is not an absolute path (it must start with '/')"
    ],
    "unknown_team.yaml": ["5:13: templates[0].teams[0]: unknown team 'ml-research'"],
    "env_name.yaml": [
        "7:7: templates[0].env[\"EDITOR=vim\"]: 'EDITOR=vim' is not a valid environment variable name "
        "(letters, digits and '_', not starting with a digit)"
    ],
    "env_value_type.yaml": ["6:14: templates[0].env.DEBUG: expected a string, got integer 1"],
    "boolean_key.yaml": ["6:7: templates[0].labels: keys must be strings, got boolean true (quote it)"],
    "multiple.yaml": [
        "6:13: templates[0].resources.cpus: expected a number, got string 'two'",
        "7:15: templates[0].resources.memory: 'lots' is not a valid memory size "
        "(use e.g. 512m, 2g, or an integer number of MiB)",
        "9:12: templates[1].image: 'Alpine:3.20' is not a valid image reference",
        "10:22: templates[1].network.modes: must not be empty",
        "11:11: templates[2].slug: duplicate slug 'debian' (first at line 3)",
        "13:5: templates[2].colour: unknown key 'colour'",
    ],
}


def run_apply(path: Path | str, *args: str) -> tuple[str, str]:
    """Run the real command; returns (stdout, stderr). Raises CommandError on problems."""
    out, err = io.StringIO(), io.StringIO()
    call_command("lsl_apply", str(path), *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def run_failing_apply(path: Path | str, *args: str) -> list[str]:
    """Run the command expecting problems; returns the stderr lines."""
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was changed"):
        call_command("lsl_apply", str(path), *args, stdout=io.StringIO(), stderr=err)
    return err.getvalue().splitlines()


def write(tmp_path: Path, text: str, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def snapshot() -> list[dict[str, Any]]:
    """Every template row with its teams, to prove a failed apply changed nothing."""
    rows = list(Template.objects.order_by("slug").values())
    for row in rows:
        row["teams"] = sorted(Template.objects.get(pk=row["id"]).teams.values_list("slug", flat=True))
    return rows


TWO_TEMPLATES = """\
    version: 1
    templates:
      - slug: busybox
        image: lsl-test/busybox:latest
      - slug: debian
        image: lsl-test/debian:bookworm
        shell: /bin/bash
"""


# --- bad files ---------------------------------------------------------------------


def test_every_bad_fixture_has_expectations() -> None:
    assert {path.name for path in BAD.glob("*.yaml")} == set(BAD_FILES)


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_reports_exact_problems_and_changes_nothing(name: str) -> None:
    run_apply(REPO / "catalog" / "test.yaml")
    create_team("Platform")  # a team exists, but not the one unknown_team.yaml names
    before = snapshot()

    lines = run_failing_apply(BAD / name)

    assert lines == [f"{BAD / name}:{expected}" for expected in BAD_FILES[name]]
    assert snapshot() == before


@pytest.mark.django_db
def test_all_problems_are_returned_and_nothing_is_reported_as_done() -> None:
    result = catalog.apply_catalog(BAD / "multiple.yaml")

    assert len(result.problems) == len(BAD_FILES["multiple.yaml"])
    assert (result.created, result.updated, result.unchanged, result.pruned) == ([], [], [], [])
    assert not Template.objects.exists()


@pytest.mark.django_db
def test_missing_file_is_a_command_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        run_apply(tmp_path / "nope.yaml")


@pytest.mark.django_db
def test_invalid_utf8_is_reported_with_position(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\ntemplates:\n  - slug: caf\xe9\n")

    assert run_failing_apply(path) == [f"{path}:3:14: (yaml): file is not valid UTF-8"]


@pytest.mark.django_db
def test_recursive_alias_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntemplates: &t [*t]\n")

    assert f"{path}:2:12: templates[0]: recursive YAML alias" in run_failing_apply(path)


# --- the shipped catalogs and the schema -------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["default.yaml", "test.yaml"])
def test_shipped_catalogs_are_valid(name: str) -> None:
    assert catalog.validate_catalog(REPO / "catalog" / name) == []


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(catalog.load_schema())


def test_schema_defaults_match_apply_defaults() -> None:
    template = catalog.load_schema()["$defs"]["template"]["properties"]
    resources = template["resources"]["properties"]
    assert resources["cpus"]["default"] == catalog.DEFAULT_CPUS
    assert resources["memory"]["default"] == catalog.DEFAULT_MEMORY_MB
    assert resources["pids"]["default"] == catalog.DEFAULT_PIDS
    assert template["network"]["properties"]["modes"]["default"] == list(catalog.DEFAULT_NETWORK_MODES)
    assert template["shell"]["default"] == catalog.DEFAULT_SHELL


@pytest.mark.parametrize(
    "image",
    [
        "debian",
        "debian:bookworm",
        "lsl-test/busybox:latest",
        "registry.example.com:5000/team/img:1.0",
        "ghcr.io/org/name_with__parts-x.y:v1.2-rc1",
        "localhost:5000/img@sha256:" + "a" * 64,
        "img:tag@sha256:" + "0" * 64,
    ],
)
def test_valid_image_references(image: str) -> None:
    assert catalog.IMAGE_REFERENCE_RE.match(image)


@pytest.mark.parametrize(
    "image",
    ["Debian", "registry..example/x", "img:", "img@sha256:abc", "-img", "img/", "a b", "img:-tag", "img@md5:" + "a" * 64],
)
def test_invalid_image_references(image: str) -> None:
    assert not catalog.IMAGE_REFERENCE_RE.match(image)


@pytest.mark.parametrize(
    ("value", "mib"),
    [(512, 512), ("512m", 512), ("512MiB", 512), ("2g", 2048), ("2G", 2048), ("1.5GiB", 1536), ("lots", None), ("0.3g", None)],
)
def test_parse_memory(value: str | int, mib: int | None) -> None:
    assert catalog.parse_memory(value) == mib


# --- applying ----------------------------------------------------------------------


@pytest.mark.django_db
def test_apply_creates_templates_with_every_field(tmp_path: Path) -> None:
    create_team("ML Research", slug="ml-research")
    path = write(tmp_path, """\
        version: 1
        templates:
          - slug: gpu
            image: registry.example:5000/ml/cuda:12.4
            description: CUDA box
            shell: /bin/bash
            env: {LANG: C.UTF-8}
            resources: {cpus: 4.5, memory: 1.5g, pids: 2048}
            network: {modes: [none, bridge]}
            mounts:
              - {source: /srv/datasets, target: /data, read_only: true}
              - {source: scratch, target: /scratch}
            allow_user_mounts: false
            setup: [apt-get update]
            labels: {com.example.owner: ml}
            teams: [ml-research]
    """)

    out, _ = run_apply(path)

    assert out.strip() == "created 1, updated 0, unchanged 0, pruned 0"
    gpu = Template.objects.get(slug="gpu")
    assert (gpu.image, gpu.description, gpu.shell) == ("registry.example:5000/ml/cuda:12.4", "CUDA box", "/bin/bash")
    assert gpu.env == {"LANG": "C.UTF-8"}
    assert (gpu.cpus, gpu.memory_mb, gpu.pids) == (4.5, 1536, 2048)
    assert gpu.network_modes == ["none", "bridge"]
    assert gpu.default_network == "none"
    assert gpu.mounts == [
        {"source": "/srv/datasets", "target": "/data", "read_only": True},
        {"source": "scratch", "target": "/scratch", "read_only": False},
    ]
    assert gpu.allow_user_mounts is False
    assert gpu.setup == ["apt-get update"]
    assert gpu.labels == {"com.example.owner": "ml"}
    assert gpu.public is False
    assert list(gpu.teams.values_list("slug", flat=True)) == ["ml-research"]
    assert gpu.managed_by_catalog is True


@pytest.mark.django_db
def test_absent_keys_get_defaults(tmp_path: Path) -> None:
    run_apply(write(tmp_path, "version: 1\ntemplates: [{slug: plain, image: alpine}]\n"))

    plain = Template.objects.get(slug="plain")
    assert (plain.cpus, plain.memory_mb, plain.pids) == (1.0, 1024, 512)
    assert plain.network_modes == ["bridge"]
    assert plain.shell == "/bin/sh"
    assert (plain.env, plain.mounts, plain.setup, plain.labels) == ({}, [], [], {})
    assert plain.public is True
    assert plain.allow_user_mounts is True


@pytest.mark.django_db
def test_yaml_merge_keys_fill_in_unset_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        templates:
          - &base
            slug: one
            image: alpine
            resources: {cpus: 2}
          - <<: *base
            slug: two
    """)

    run_apply(path)

    two = Template.objects.get(slug="two")
    assert (two.image, two.cpus) == ("alpine", 2.0)


@pytest.mark.django_db
def test_reapply_reports_everything_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_TEMPLATES)
    assert run_apply(path)[0].strip() == "created 2, updated 0, unchanged 0, pruned 0"
    before = snapshot()

    out, _ = run_apply(path)

    assert out.strip() == "created 0, updated 0, unchanged 2, pruned 0"
    assert snapshot() == before  # not even updated_at moved


@pytest.mark.django_db
def test_changed_field_is_updated_and_removed_key_resets_to_default(tmp_path: Path) -> None:
    run_apply(write(tmp_path, TWO_TEMPLATES.replace("shell: /bin/bash", "shell: /bin/bash\n        resources: {pids: 64}")))
    assert Template.objects.get(slug="debian").pids == 64

    out, _ = run_apply(write(tmp_path, TWO_TEMPLATES.replace("debian:bookworm", "debian:trixie")))

    assert out.strip() == "created 0, updated 1, unchanged 1, pruned 0"
    debian = Template.objects.get(slug="debian")
    assert debian.image == "lsl-test/debian:trixie"
    assert debian.pids == catalog.DEFAULT_PIDS


@pytest.mark.django_db
def test_team_change_is_an_update(tmp_path: Path) -> None:
    create_team("Ops", slug="ops")
    run_apply(write(tmp_path, TWO_TEMPLATES))

    out, _ = run_apply(write(tmp_path, TWO_TEMPLATES + "        teams: [ops]\n"))

    assert out.strip() == "created 0, updated 1, unchanged 1, pruned 0"
    debian = Template.objects.get(slug="debian")
    assert debian.public is False
    assert list(debian.teams.values_list("slug", flat=True)) == ["ops"]


@pytest.mark.django_db
def test_dry_run_reports_but_changes_nothing(tmp_path: Path) -> None:
    run_apply(REPO / "catalog" / "test.yaml")
    before = snapshot()
    path = write(tmp_path, TWO_TEMPLATES + "      - slug: extra\n        image: alpine\n")

    out, _ = run_apply(path, "--dry-run", "--prune")

    assert out.strip() == "(dry run) created 1, updated 2, unchanged 0, pruned 0"
    assert snapshot() == before


@pytest.mark.django_db
def test_verbose_output_names_each_template(tmp_path: Path) -> None:
    out = io.StringIO()
    call_command("lsl_apply", str(write(tmp_path, TWO_TEMPLATES)), verbosity=2, stdout=out)

    assert out.getvalue().splitlines() == ["created busybox", "created debian", "created 2, updated 0, unchanged 0, pruned 0"]


@pytest.mark.django_db
def test_prune_removes_dropped_catalog_templates_only(tmp_path: Path) -> None:
    run_apply(write(tmp_path, TWO_TEMPLATES))
    Template.objects.create(slug="handmade", image="alpine", managed_by_catalog=False)
    only_busybox = write(tmp_path, TWO_TEMPLATES.split("      - slug: debian")[0])

    assert run_apply(only_busybox)[0].strip() == "created 0, updated 0, unchanged 1, pruned 0"
    assert Template.objects.filter(slug="debian").exists()  # without --prune nothing is deleted

    out, _ = run_apply(only_busybox, "--prune")

    assert out.strip() == "created 0, updated 0, unchanged 1, pruned 1"
    assert sorted(Template.objects.values_list("slug", flat=True)) == ["busybox", "handmade"]


@pytest.mark.django_db
def test_prune_refuses_template_in_use_and_rolls_everything_back(tmp_path: Path) -> None:
    run_apply(write(tmp_path, TWO_TEMPLATES))
    owner = get_user_model().objects.create_user("alice")
    debian = Template.objects.get(slug="debian")
    Environment.objects.create(name="dev", owner=owner, template=debian, image=debian.image, cpus=1, memory_mb=64, pids=64)
    before = snapshot()
    # Drop debian *and* change busybox: the busybox update must be rolled back too.
    path = write(tmp_path, "version: 1\ntemplates:\n  - slug: busybox\n    image: busybox:1.36\n")

    lines = run_failing_apply(path, "--prune")

    assert lines == [f"{path}:2:1: templates: cannot prune template 'debian': still used by 1 environment"]
    assert snapshot() == before
