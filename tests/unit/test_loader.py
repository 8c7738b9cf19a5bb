"""loader: every bad pipeline file is one line naming file, line and key; good files load with defaults."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from orchestrator.errors import SpecError, UsageError
from orchestrator.loader import load_pipeline, resolve_secrets
from orchestrator.spec import Build, Pipeline, json_schema
from orchestrator.units import format_bytes
from orchestrator.yamlfile import MAX_FILE_BYTES, read_yaml

SCHEMA = jsonschema.Draft202012Validator(json_schema())

MakePipeline = Callable[..., Path]
REPO = Path(__file__).resolve().parents[2]


def text(source: str) -> str:
    """The YAML as written in the test: line 1 is the first line after the opening quotes."""
    return textwrap.dedent(source).lstrip("\n")


def error_of(make_pipeline: MakePipeline, source: str, files: dict[str, str | bytes] | None = None,
             schema_gap: str = "") -> str:
    """The loader's one-line error for `source`, after checking that `pipe schema` agrees (unless the case is
    one of spec.json_schema's documented gaps, named in `schema_gap`: then the schema must still accept it, so
    a schema that learns the rule fails here until the gap is struck)."""
    path = make_pipeline(text(source), files)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    assert_schema_agrees(path, schema_gap)
    return message.removeprefix(f"{path}:")


def assert_schema_agrees(path: Path, gap: str = "") -> None:
    """`pipe schema` and the loader give the document the same verdict on its shape (issue 14, item 19).

    Every bad-input case of this file passes here. Not judged: a file that never becomes a JSON document (YAML
    refusals, NaN); and, by design, the loader's checks after the models (files on disk, this machine, needs
    and cycles, cron and time zones): a document the models accept the schema accepts too.
    """
    try:
        data, _ = read_yaml(path)
        json.dumps(data, allow_nan=False)
    except (SpecError, ValueError):
        return  # not a JSON document: nothing for a JSON Schema to judge
    try:
        Pipeline.model_validate(data)
    except Exception:  # noqa: BLE001 - pydantic's or a SpecError from a model validator: the shape is wrong
        models_accept = False
    else:
        models_accept = True
    if gap:
        assert SCHEMA.is_valid(data) and not models_accept, f"no longer a schema gap ({gap}): strike it"
        return
    assert SCHEMA.is_valid(data) == models_accept, (
        f"the loader's models {'accept' if models_accept else 'refuse'} {data!r} but `pipe schema` does not agree: "
        + "; ".join(e.message for e in SCHEMA.iter_errors(data)))


# -- YAML itself ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_its_line(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: [busybox
          train:
            image: busybox
        """)
    assert message.startswith("4: (yaml): YAML syntax: did not find expected ',' or ']'")


def test_tab_indentation_says_so(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, "stages:\n  data:\n\timage: busybox\n")
    assert message == (
        "3: (yaml): YAML syntax: found character that cannot start any token (tabs cannot indent YAML: use spaces)"
    )


def test_duplicate_key_is_refused_at_the_second_one(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            command: [a]
            image: other
        """)
    assert message == "5: stages.data.image: duplicate key (first on line 3): keep one"


def test_duplicate_stage_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
          data:
            image: other
        """)
    assert message == "4: stages.data: duplicate key (first on line 2): keep one"


def test_duplicate_key_deep_in_params_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            params:
              model: {depth: 3, depth: 4}
        """)
    assert message == "5: stages.data.params.model.depth: duplicate key (first on line 5): keep one"


def test_billion_laughs_alias_bomb_is_refused_without_expansion(make_pipeline: MakePipeline) -> None:
    layers = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    layers += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 strings
    message = error_of(make_pipeline, "\n".join([*layers, "stages: {data: {image: busybox, params: {x: *a8}}}"]))
    assert message.startswith("2: a1.0: aliases expand this file to 2,")  # billions
    assert message.endswith("values, over the limit of 10,000 (10 times the 119 written): refused as an alias bomb")


def test_merge_key_bomb_is_refused(make_pipeline: MakePipeline) -> None:
    layers = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10}"]
    layers += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}], k: {i}}}" for i in range(1, 8)]
    message = error_of(make_pipeline, "\n".join([*layers, "stages: {data: {image: busybox}}"]))
    assert message.startswith("2: m1.<<.0: aliases expand this file to")
    assert message.endswith("refused as an alias bomb")


def test_recursive_alias_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        loop: &loop [*loop]
        stages: {data: {image: busybox}}
        """)
    assert message == "1: loop.0: alias *loop refers to itself"


def test_undefined_alias_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: *base
        """)
    assert message == "3: stages.data.image: alias *base is not defined above"


def test_file_over_the_size_cap_is_refused_unread(make_pipeline: MakePipeline) -> None:
    padding = "# " + "x" * 100 + "\n"
    message = error_of(make_pipeline, padding * (MAX_FILE_BYTES // len(padding) + 1) + "stages: {}\n")
    assert message == "1: (file): larger than the 1 MiB a pipeline file may be"


def test_bytes_that_are_not_utf8_are_refused(make_pipeline: MakePipeline, tmp_path: Path) -> None:
    path = make_pipeline("stages: {}\n")
    path.write_bytes(b"stages:\n  data:\n    image: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == f"{path}:3: (file): not UTF-8: byte 0xe9 at column 15; save the file as UTF-8"


def test_python_object_tag_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            params: !!python/object/apply:os.system [echo pwned]
        """)
    assert message == (
        "4: stages.data.params: tag !!python/object/apply:os.system is not allowed: "
        "a pipeline file holds plain strings, numbers, lists and mappings"
    )


def test_custom_tag_on_a_scalar_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: !env IMAGE
        """)
    assert message.startswith("3: stages.data.image: tag !env is not allowed")


def test_empty_file_is_refused(make_pipeline: MakePipeline) -> None:
    assert error_of(make_pipeline, "") == "1: (file): the file is empty: write a mapping with 'stages'"


def test_file_of_comments_only_is_refused(make_pipeline: MakePipeline) -> None:
    assert error_of(make_pipeline, "# nothing yet\n") == "1: (file): the file is empty: write a mapping with 'stages'"


def test_top_level_list_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, "- data\n- train\n")
    assert message == "1: (top level): expected a mapping with 'stages', got a list"


def test_more_than_one_document_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages: {data: {image: busybox}}
        ---
        stages: {train: {image: busybox}}
        """)
    assert message == "2: (file): holds more than one YAML document (---): keep one"


def test_key_that_yaml_reads_as_a_boolean_must_be_quoted(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            params:
              on: 1
        """)
    assert message == "5: stages.data.params: key 'on' is read by YAML as true or false, not a string: quote it"


def test_nesting_past_the_limit_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, "stages: {data: {image: busybox, params: {p: " + "[" * 80 + "]" * 80 + "}}}\n")
    assert message.startswith("1: stages.data.params.p.0.0.0")
    assert message.endswith(": nested more than 64 levels deep")


def test_control_character_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, "stages:\n  data:\n    image: bus\x07box\n")
    assert message == "3: (yaml): character #x0007 is not allowed: control characters are not allowed"


# -- the schema -----------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
          train:
            image: busybox
            need: [data]
        """)
    assert message == "6: stages.train.need: unknown key (did you mean 'needs'?)"


def test_unknown_top_level_key_suggests_the_close_one(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        name: iris
        stage:
          data: {image: busybox}
        """)
    assert message == "2: stage: unknown key (did you mean 'stages'?)"


def test_unknown_key_in_resources_suggests_the_close_one(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            resources:
              cpu: 1
        """)
    assert message == "5: stages.data.resources.cpu: unknown key (did you mean 'cpus'?)"


@pytest.mark.parametrize("key", ["privileged: true", "network_mode: host", "pid: host", "cap_add: [ALL]",
                                 "volumes: [/var/run/docker.sock:/var/run/docker.sock]", "devices: [/dev/sda]"])
def test_keys_asking_for_host_access_are_unknown_keys(make_pipeline: MakePipeline, key: str) -> None:
    message = error_of(make_pipeline, f"""
        stages:
          data:
            image: busybox
            {key}
        """)
    assert message.startswith(f"4: stages.data.{key.partition(':')[0]}: unknown key")


def test_the_first_error_in_the_file_is_reported(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          zeta:
            image: busybox
            timeout: soon
          alpha:
            image: busybox
            retries: many
        """)
    assert message == "4: stages.zeta.timeout: not a duration: 'soon' (use e.g. 90s, 20m, 1h30m)"


def test_inputs_as_a_string_expects_a_list_of_strings(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            inputs: data/raw.csv
        """, {"data/raw.csv": "x\n"})
    assert message == "4: stages.data.inputs: expected a list of strings, got the string 'data/raw.csv'"


def test_number_where_a_string_belongs_says_to_quote_it(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            env:
              PORT: 8080
        """)
    assert message == "5: stages.data.env.PORT: expected a string, got 8080 (quote it to make it a string)"


def test_command_of_the_wrong_type(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            command: {run: x}
        """)
    assert message == "4: stages.data.command: expected a string or a list of strings, got a mapping"


def test_build_of_the_wrong_type(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            build: 3
        """)
    assert message == (
        "3: stages.data.build: expected a string (the build context) or a mapping with context, dockerfile, args, "
        "got 3"
    )


def test_stage_that_is_not_a_mapping(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data: busybox
        """)
    assert message == "2: stages.data: expected a mapping, got the string 'busybox'"


def test_retry_on_outside_its_choices(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            retry_on: [error, crash]
        """)
    assert message == "4: stages.data.retry_on.1: expected 'error', 'oom', 'timeout' or 'node_lost', got the string 'crash'"


def test_negative_cpus(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            resources: {cpus: -1}
        """)
    assert message == "4: stages.data.resources.cpus: must be greater than 0, got -1"


def test_missing_required_key_points_at_its_parent(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
        schedule:
          timezone: UTC
        """)
    assert message == "4: schedule.cron: required key is missing"


def test_missing_stages(make_pipeline: MakePipeline) -> None:
    assert error_of(make_pipeline, "name: iris\n") == "1: stages: required key is missing"


def test_no_stages(make_pipeline: MakePipeline) -> None:
    assert error_of(make_pipeline, "stages: {}\n") == "1: stages: needs at least one stage"


def test_needs_naming_a_missing_stage_points_at_the_needs_line(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
          train:
            image: busybox
            needs:
              - data
              - dta
        """)
    assert message == "8: stages.train.needs: unknown stage 'dta' (did you mean 'data'?)"


def test_needs_naming_a_far_off_stage_lists_the_stages(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data: {image: busybox}
          train: {image: busybox, needs: [zzz]}
        """)
    assert message == "3: stages.train.needs: unknown stage 'zzz' (stages: data, train)"


def test_cycle_is_named_from_its_first_stage_in_the_file(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            needs: [train]
          train:
            image: busybox
            needs: [data]
        """)
    assert message == "4: stages.data.needs: cycle: data -> train -> data"


def test_longer_cycle_follows_the_data(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          ok:
            image: busybox
          evaluate:
            image: busybox
            needs: [ok, train]
          data:
            image: busybox
            needs: [evaluate]
          train:
            image: busybox
            needs: [data]
        """)
    assert message == "6: stages.evaluate.needs: cycle: evaluate -> data -> train -> evaluate"


def test_stage_needing_itself_is_a_cycle(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            needs: [data]
        """)
    assert message == "4: stages.data.needs: cycle: data -> data"


def test_both_image_and_build(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            build: stages/data
        """, {"stages/data/Dockerfile": "FROM busybox\n"})
    assert message == "3: stages.data.image: set either 'image' or 'build', not both"


def test_neither_image_nor_build(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            command: [echo, hi]
        """)
    assert message == "2: stages.data: needs 'image' (an existing image) or 'build' (a folder with a Dockerfile)"


@pytest.mark.parametrize(
    ("name", "line"),
    [("Train", 4), ("1st", 4), ("train.v2", 4), ("train stage", 4), ("x" * 64, 4), ("trä", 4)],
)
def test_unsafe_stage_name(make_pipeline: MakePipeline, name: str, line: int) -> None:
    message = error_of(make_pipeline, f"""
        stages:
          data:
            image: busybox
          "{name}":
            image: busybox
        """)
    assert message == (
        f"{line}: stages.{name}: not a safe name: use lower-case letters, digits, - and _ (a letter first, at most 63)"
    )


def test_unsafe_env_name(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            env: {"LOG-LEVEL": info}
        """)
    assert message.startswith("4: stages.data.env.LOG-LEVEL: not an environment variable name")


def test_memory_that_does_not_parse(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            resources:
              memory: 2 gigs
        """)
    assert message == "5: stages.data.resources.memory: not a memory size: '2 gigs' (use e.g. 512m, 2g)"


def test_memory_below_the_engine_minimum(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            resources: {memory: 512k}
        """, schema_gap="6 MiB as a minimum of a size written as a string")
    assert message == "4: stages.data.resources.memory: 512 KiB is below the engine's minimum of 6 MiB"


def test_duration_that_does_not_parse(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            timeout: 20 minutes
        """)
    assert message == "4: stages.data.timeout: not a duration: '20 minutes' (use e.g. 90s, 20m, 1h30m)"


def test_metrics_path_that_is_absolute(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          evaluate:
            image: busybox
            metrics: /outputs/metrics.json
            gate: {metric: r2, min: 0.4}
        """)
    assert message == (
        "4: stages.evaluate.metrics: '/outputs/metrics.json' is absolute: use a path relative to the stage's /outputs"
    )


def test_metrics_path_that_leaves_outputs(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          evaluate:
            image: busybox
            metrics: reports/../../metrics.json
            gate: {metric: r2, min: 0.4}
        """, schema_gap="a path that leaves by an inner '..'")
    assert message == "4: stages.evaluate.metrics: 'reports/../../metrics.json' leaves the stage's /outputs"


def test_gate_without_metrics(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          evaluate:
            image: busybox
            gate: {metric: r2, min: 0.4}
        """)
    assert message == "4: stages.evaluate.gate: 'gate' needs 'metrics' (the JSON file in /outputs the gate reads)"


# -- checks against the disk and the machine -------------------------------------------------------------------


def test_input_that_does_not_exist_points_at_its_item(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        stages:
          data:
            image: busybox
            inputs:
              - data/raw.csv
              - data/extra.csv
        """), {"data/raw.csv": "x\n"})
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == f"{path}:6: stages.data.inputs: 'data/extra.csv' does not exist in {path.parent}"


def test_input_that_is_absolute(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            inputs: [/etc/passwd]
        """)
    assert message == "4: stages.data.inputs: '/etc/passwd' is absolute: use a path relative to the pipeline's folder"


def test_input_that_leaves_the_folder(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            inputs: [data/../../secret.txt]
        """, schema_gap="a path that leaves by an inner '..'")
    assert message == "4: stages.data.inputs: 'data/../../secret.txt' leaves the pipeline's folder"


def test_input_that_is_a_symlink_out_of_the_folder(make_pipeline: MakePipeline, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("top secret\n")
    path = make_pipeline(text("""
        stages:
          data:
            image: busybox
            inputs: [data/link.txt]
        """))
    (path.parent / "data").mkdir()
    (path.parent / "data/link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == (
        f"{path}:4: stages.data.inputs: 'data/link.txt' is a symlink to {tmp_path / 'secret.txt'}, "
        "outside the pipeline's folder"
    )


def test_input_folder_holding_a_symlink_out_of_the_folder(make_pipeline: MakePipeline, tmp_path: Path) -> None:
    path = make_pipeline(text("""
        stages:
          data:
            image: busybox
            inputs: [data]
        """), {"data/raw.csv": "x\n", "data/deep/ok.csv": "y\n"})
    (path.parent / "data/deep/inside").symlink_to(path.parent / "data/raw.csv")  # inside: fine
    (path.parent / "data/deep/escape").symlink_to("/etc")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == (
        f"{path}:4: stages.data.inputs: 'data' holds 'data/deep/escape', a symlink out of the pipeline's folder"
    )


def test_input_that_is_a_broken_symlink(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        stages:
          data:
            image: busybox
            inputs: [gone.csv]
        """))
    (path.parent / "gone.csv").symlink_to(path.parent / "nowhere.csv")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == f"{path}:4: stages.data.inputs: 'gone.csv' is a broken symlink"


def test_build_context_that_leaves_the_folder(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            build: ../elsewhere
        """)
    assert message == "3: stages.data.build.context: '../elsewhere' leaves the pipeline's folder"


def test_build_context_that_is_a_symlink_out(make_pipeline: MakePipeline, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/Dockerfile").write_text("FROM busybox\n")
    path = make_pipeline(text("""
        stages:
          data:
            build:
              context: stages/data
        """))
    (path.parent / "stages").mkdir()
    (path.parent / "stages/data").symlink_to(tmp_path / "outside")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == (
        f"{path}:4: stages.data.build.context: 'stages/data' is a symlink to {tmp_path / 'outside'}, "
        "outside the pipeline's folder"
    )


def test_build_context_that_does_not_exist(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        stages:
          data:
            build: stages/data
        """))
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == f"{path}:3: stages.data.build.context: 'stages/data' does not exist in {path.parent}"


def test_dockerfile_that_does_not_exist(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        stages:
          data:
            build:
              context: stages/data
              dockerfile: Dockerfile.gpu
        """), {"stages/data/Dockerfile": "FROM busybox\n"})
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value) == (
        f"{path}:5: stages.data.build.dockerfile: 'stages/data/Dockerfile.gpu' does not exist in {path.parent}"
    )


def test_dockerfile_that_leaves_the_folder(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            build:
              context: stages/data
              dockerfile: ../../../Dockerfile
        """, {"stages/data/Dockerfile": "FROM busybox\n"})
    assert message == "5: stages.data.build.dockerfile: 'stages/data/../../../Dockerfile' leaves the pipeline's folder"


def test_cpus_over_the_machine(make_pipeline: MakePipeline) -> None:
    cpus = os.cpu_count() or 1
    message = error_of(make_pipeline, f"""
        stages:
          train:
            image: busybox
            resources:
              cpus: {cpus + 1}
        """)
    assert message == f"5: stages.train.resources.cpus: {cpus + 1} CPUs exceed this machine's {cpus}"


def test_memory_over_the_machine(make_pipeline: MakePipeline) -> None:
    machine = format_bytes(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    message = error_of(make_pipeline, """
        stages:
          train:
            image: busybox
            resources:
              memory: 64t
        """)
    assert message == f"5: stages.train.resources.memory: 64 TiB exceeds this machine's {machine}"


def test_default_memory_over_the_machine(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        defaults:
          resources: {memory: 64t}
        stages:
          train: {image: busybox}
        """)
    assert message.startswith("2: defaults.resources.memory: 64 TiB exceeds this machine's")


def test_invalid_cron(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        schedule:
          cron: "0 3 * *"
        stages:
          train: {image: busybox}
        """)
    assert message.startswith("2: schedule.cron: not a valid cron expression: '0 3 * *'")  # cron.py words the rest


def test_unknown_time_zone(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        schedule:
          cron: "@daily"
          timezone: Europe/Atlantis
        stages:
          train: {image: busybox}
        """)
    assert message == (
        "3: schedule.timezone: unknown time zone 'Europe/Atlantis' (use an IANA name such as Europe/Berlin)"
    )


def test_secrets_file_that_does_not_exist(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        secrets_file: ~/no-such-pipe-secrets.env
        stages:
          train: {image: busybox, secrets: [API_TOKEN]}
        """))
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    missing = Path("~/no-such-pipe-secrets.env").expanduser()
    assert str(info.value) == f"{path}:1: secrets_file: {missing} does not exist"


def test_missing_pipeline_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"pipeline.yaml: no such file \(name the pipeline file"):
        load_pipeline(tmp_path / "pipeline.yaml")


# -- good files -----------------------------------------------------------------------------------------------

ISSUE_EXAMPLE = """
name: iris                       # optional, defaults to the folder's name
stages:
  data:
    build: stages/data           # a build context with a Dockerfile (string, or {context, dockerfile, args})
    command: ["python3", "/app/data.py"]   # list, or a string run by /bin/sh -c
    inputs: [data/raw.csv]       # host files or folders, relative to pipeline.yaml
    params: {seed: 42, test_size: 0.2}
    env: {LOG_LEVEL: info}
  train:
    image: my-trainer:1.2        # an existing image instead of build:
    needs: [data]                # upstream stages
    resources: {cpus: 1.5, memory: 2g, gpus: 0, pids: 512}
    timeout: 20m
"""
ISSUE_FILES: dict[str, str | bytes] = {"stages/data/Dockerfile": "FROM busybox\n", "data/raw.csv": "a,b\n1,2\n"}


def test_issue_example_loads_with_units_parsed(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(ISSUE_EXAMPLE.lstrip("\n"), ISSUE_FILES))
    data, train = pipeline.stages["data"], pipeline.stages["train"]
    assert pipeline.display_name == "iris"
    assert data.build == Build(context="stages/data", dockerfile="Dockerfile")
    assert data.argv() == ("python3", "/app/data.py")
    assert data.inputs == ("data/raw.csv",)
    assert data.params == {"seed": 42, "test_size": 0.2}
    assert train.needs == ("data",)
    assert (train.resources.cpus, train.resources.memory, train.resources.pids) == (1.5, 2 * 1024**3, 512)
    assert train.timeout == 1200.0


def test_defaults_are_filled(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline("stages:\n  train:\n    image: busybox\n"))
    stage = pipeline.stages["train"]
    assert (stage.command, stage.argv(), stage.inputs, stage.needs, stage.params, stage.env) == (
        None, None, (), (), {}, {})
    assert (stage.retries, stage.retry_on, stage.cache, stage.network, stage.user, stage.timeout) == (
        0, ("error",), True, False, None, None)
    caps = pipeline.resources_of("train")
    assert (caps.cpus, caps.memory, caps.gpus, caps.pids) == (None, 4 * 1024**3, 0, 1024)
    assert pipeline.timeout_of("train") is None


def test_name_defaults_to_the_folder(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline("stages:\n  train:\n    image: busybox\n"))
    assert pipeline.name is None
    assert pipeline.display_name == "project"


def test_string_command_runs_under_the_shell(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline("stages:\n  train:\n    image: busybox\n    command: echo hi > /outputs/x\n"))
    assert pipeline.stages["train"].argv() == ("/bin/sh", "-c", "echo hi > /outputs/x")


def test_build_mapping_keeps_dockerfile_and_args(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(text("""
        stages:
          train:
            build: {context: stages/train, dockerfile: gpu/Dockerfile, args: {BASE: debian}}
        """), {"stages/train/gpu/Dockerfile": "FROM busybox\n"}))
    assert pipeline.stages["train"].build == Build(
        context="stages/train", dockerfile="gpu/Dockerfile", args={"BASE": "debian"})


def test_defaults_section_overrides_only_what_it_sets(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(text("""
        defaults:
          resources: {cpus: 1}
          timeout: 1h
        stages:
          train: {image: busybox, resources: {memory: 1g}}
        """)))
    caps = pipeline.resources_of("train")
    assert (caps.cpus, caps.memory, caps.pids) == (1.0, 1024**3, 1024)
    assert pipeline.timeout_of("train") == 3600.0


def test_user_root_is_allowed(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline("stages:\n  train:\n    image: busybox\n    user: root\n"))
    assert pipeline.stages["train"].user == "root"


def test_inputs_are_normalised(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(
        "stages:\n  train:\n    image: busybox\n    inputs: [./data/, data/../raw.csv]\n",
        {"data/a.csv": "a\n", "raw.csv": "r\n"}))
    assert pipeline.stages["train"].inputs == ("data", "raw.csv")


def test_symlink_inside_the_folder_is_fine(make_pipeline: MakePipeline) -> None:
    path = make_pipeline("stages:\n  train:\n    image: busybox\n    inputs: [current.csv]\n", {"v2.csv": "x\n"})
    (path.parent / "current.csv").symlink_to("v2.csv")
    assert load_pipeline(path).stages["train"].inputs == ("current.csv",)


def test_params_keep_yaml_types_but_dates_stay_strings(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(text("""
        stages:
          train:
            image: busybox
            params: {n: 300, lr: 1.0e-3, deep: yes, none: ~, since: 2024-01-31, tag: "007", hex: 0x1f}
        """)))
    assert pipeline.stages["train"].params == {
        "n": 300, "lr": 0.001, "deep": True, "none": None, "since": "2024-01-31", "tag": "007", "hex": 31}


def test_merge_keys_share_settings_and_written_keys_win(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(text("""
        stages:
          data: &common
            image: busybox
            resources: {memory: 1g}
          train:
            <<: *common
            image: trainer
            needs: [data]
        """)))
    train = pipeline.stages["train"]
    assert (train.image, train.resources.memory, train.needs) == ("trainer", 1024**3, ("data",))
    assert pipeline.source.line_of("stages.train.resources") == 6  # a merged key is on the `<<` line
    assert pipeline.source.line_of("stages.train.image") == 7


def test_merge_of_something_that_is_not_a_mapping(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            <<: 3
            image: busybox
        """)
    assert message == "3: stages.data.<<: '<<' merges a mapping or a list of mappings, not 3"


def test_quoted_merge_key_is_an_ordinary_key(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages:
          data:
            image: busybox
            "<<": {image: other}
        """)
    assert message.startswith("4: stages.data.<<: unknown key")


def test_a_byte_order_mark_is_ignored(make_pipeline: MakePipeline) -> None:
    path = make_pipeline("stages: {}\n")
    path.write_bytes(b"\xef\xbb\xbfstages:\n  train:\n    image: busybox\n")
    assert list(load_pipeline(path).stages) == ["train"]


def test_lines_of_keys_are_kept_for_later_checks(make_pipeline: MakePipeline) -> None:
    pipeline = load_pipeline(make_pipeline(ISSUE_EXAMPLE.lstrip("\n"), ISSUE_FILES))
    error = pipeline.error("stages.train.resources.memory", "too much")
    assert str(error) == f"{pipeline.path}:12: stages.train.resources.memory: too much"
    assert pipeline.source.line_of("stages.data.inputs.0") == 6
    assert pipeline.source.line_of("stages.train.no.such.key") == 9


# -- secrets --------------------------------------------------------------------------------------------------


def secret_pipeline(make_pipeline: MakePipeline, secrets_file: str | None = None) -> Pipeline:
    head = f"secrets_file: {secrets_file}\n" if secrets_file else ""
    return load_pipeline(make_pipeline(head + text("""
        stages:
          data:
            image: busybox
            secrets: [API_TOKEN]
          train:
            image: busybox
            secrets: [API_TOKEN, DB_PASSWORD]
        """), {"secrets.env": text("""
        # pipe secrets
        export API_TOKEN=from-file
        DB_PASSWORD = "p=ss word"
        """)}))


def test_secrets_come_from_the_environment(make_pipeline: MakePipeline) -> None:
    pipeline = secret_pipeline(make_pipeline)
    environ = {"API_TOKEN": "t0k", "DB_PASSWORD": "pw", "OTHER": "x"}
    assert resolve_secrets(pipeline, environ) == {"API_TOKEN": "t0k", "DB_PASSWORD": "pw"}


def test_secrets_file_fills_in_and_the_environment_wins(make_pipeline: MakePipeline) -> None:
    pipeline = secret_pipeline(make_pipeline, "secrets.env")
    assert resolve_secrets(pipeline, {}) == {"API_TOKEN": "from-file", "DB_PASSWORD": "p=ss word"}
    assert resolve_secrets(pipeline, {"API_TOKEN": "env"}) == {"API_TOKEN": "env", "DB_PASSWORD": "p=ss word"}


def test_missing_secret_names_it_and_the_stage_but_no_value(make_pipeline: MakePipeline) -> None:
    pipeline = secret_pipeline(make_pipeline)
    with pytest.raises(SpecError) as info:
        resolve_secrets(pipeline, {"API_TOKEN": "s3cr3t-value"})
    assert str(info.value) == f"{pipeline.path}:7: stages.train.secrets: secret DB_PASSWORD is not set: export it"
    assert "s3cr3t" not in str(info.value)


def test_missing_secret_mentions_the_secrets_file(make_pipeline: MakePipeline) -> None:
    pipeline = secret_pipeline(make_pipeline, "secrets.env")
    (pipeline.root / "secrets.env").write_text("API_TOKEN=abc\n")
    with pytest.raises(SpecError) as info:
        resolve_secrets(pipeline, {})
    assert str(info.value) == (
        f"{pipeline.path}:8: stages.train.secrets: secret DB_PASSWORD is not set: "
        f"export it or add it to {pipeline.root / 'secrets.env'}"
    )


def test_bad_line_in_the_secrets_file_is_named_but_not_shown(make_pipeline: MakePipeline) -> None:
    pipeline = secret_pipeline(make_pipeline, "secrets.env")
    (pipeline.root / "secrets.env").write_text("# ok\nhunter2-no-equals\n")
    with pytest.raises(SpecError) as info:
        resolve_secrets(pipeline, {})
    assert str(info.value) == (
        f"{pipeline.root / 'secrets.env'}:2: secrets_file: expected NAME=VALUE (the line is not shown: it may be secret)"
    )


# -- the JSON Schema that `pipe schema` prints ----------------------------------------------------------------

KITCHEN_SINK = """
name: everything
defaults: {resources: {cpus: 1, memory: 1g, pids: 256}, timeout: 2h, tmp_size: 64m}
schedule: {cron: "0 3 * * 1-5", timezone: Europe/Berlin, overlap: queue, catchup: true}
secrets_file: secrets.env
stages:
  data:
    build: {context: stages/data, dockerfile: Dockerfile, args: {BASE: debian}}
    command: python3 /app/data.py --fast
    entrypoint: [/usr/bin/env]
    inputs: [data/raw.csv]
    params: {seed: 42, nested: {a: [1, 2]}}
    env: {LOG_LEVEL: info}
    secrets: [API_TOKEN]
    resources: {cpus: 0.5, memory: 512m, gpus: 0, pids: 64}
    timeout: 90s
    retries: 2
    retry_delay: 5s
    retry_on: [error, oom, timeout]
    cache: false
    metrics: metrics.json
    gate: {metric: r2, min: 0.4, max: 1.0, max_drop: 0.02}
    user: root
    network: true
"""


@pytest.mark.parametrize("example", [ISSUE_EXAMPLE, KITCHEN_SINK], ids=["issue-example", "every-key"])
def test_json_schema_accepts_the_documented_keys(example: str) -> None:
    jsonschema.validate(yaml.safe_load(example), json_schema())


@pytest.mark.parametrize(
    "bad",
    [
        {"stages": {"train": {"image": "x", "need": ["data"]}}},
        {"stages": {"Train": {"image": "x"}}},
        {"stages": {"train": {"image": "x", "privileged": True}}},
        {"stages": {"train": {"image": "x", "command": 3}}},
        {"stages": {}},
        {"stages": {"train": {"image": "x", "network": "yes"}}},
        {"stages": {"train": {"image": "x", "retries": "2"}}},
        {"stages": {"train": {"image": "x", "resources": {"gpus": True}}}},
        {"stages": {"train": {"image": "x", "resources": {"cpus": "1.5"}}}},
        {"stages": {"train": {"image": "x", "build": "stages/train"}}},
        {"stages": {"train": {"command": "true"}}},
        {"stages": {"train": {"image": "x", "gate": {"metric": "r2", "min": 0.4}}}},
        {"stages": {"train": {"image": "x", "command": []}}},
        {"stages": {"train": {"image": "x", "inputs": ["/etc/passwd"]}}},
        {"stages": {"train": {"image": "x", "resources": {"memory": "lots"}}}},
        {"stages": {"train": {"image": "x", "timeout": "soon"}}},
    ],
    ids=["typo", "unsafe-name", "privileged", "command-type", "no-stages", "network-yes", "retries-string",
         "gpus-true", "cpus-string", "image-and-build", "neither-image-nor-build", "gate-without-metrics",
         "empty-command", "absolute-input", "memory-words", "duration-words"],
)
def test_json_schema_rejects_what_the_loader_rejects(bad: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema())
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError):
        load_pipeline(path)


def test_json_schema_is_draft_2020_12_with_an_id_and_describes_string_forms() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("https://") and schema["title"]
    jsonschema.Draft202012Validator.check_schema(schema)
    stage = schema["$defs"]["Stage"]["properties"]
    assert any(form.get("type") == "string" for form in stage["build"]["anyOf"])
    assert any(form.get("type") == "string" for form in stage["command"]["anyOf"])
    assert any(form.get("type") == "string" for form in schema["$defs"]["Resources"]["properties"]["memory"]["anyOf"])


EXAMPLES = [REPO / "pipeline.yaml"]  # every example pipeline in the repository, and README's


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## The pipeline file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return block


@pytest.mark.parametrize("example", ["pipeline.yaml", "README.md"])
def test_every_example_pipeline_is_valid_for_the_loader_and_the_schema(example: str, tmp_path: Path) -> None:
    if example == "pipeline.yaml":
        path = REPO / "pipeline.yaml"
    else:
        path = tmp_path / "pipeline.yaml"
        path.write_text(readme_example())
        for folder in ("stages/data", "stages/evaluate"):
            (tmp_path / folder).mkdir(parents=True)
            (tmp_path / folder / "Dockerfile").write_text("FROM busybox\n")
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "raw.csv").write_text("a\n")
    load_pipeline(path)
    data, _ = read_yaml(path)
    SCHEMA.validate(data)


# -- numbers /pipe/params.json can hold, and types the schema agrees on ------------------------------------------


@pytest.mark.parametrize(("value", "key"), [(".nan", "noise"), ("-.inf", "noise"), ("[1, .inf]", "noise.1"),
                                            ("{a: {b: .NaN}}", "noise.a.b")])
def test_a_param_that_is_not_a_finite_number_is_refused_on_its_line(make_pipeline: MakePipeline, value: str,
                                                                      key: str) -> None:
    message = error_of(make_pipeline, f"""
        stages:
          data:
            image: busybox
            params:
              seed: 1
              noise: {value}
        """)
    assert message == (f"6: stages.data.params.{key}: not a finite number: JSON (/pipe/params.json) cannot hold "
                       "NaN or infinity; quote it to pass a string")


@pytest.mark.parametrize(("line", "expected"), [
    ("network: 'yes'", "4: stages.data.network: expected true or false, got the string 'yes'"),
    ("cache: 1", "4: stages.data.cache: expected true or false, got 1"),
    ("retries: '2'", "4: stages.data.retries: expected a whole number, got the string '2'"),
    ("resources: {gpus: true}", "4: stages.data.resources.gpus: expected a whole number, got true"),
    ("resources: {cpus: '1.5'}", "4: stages.data.resources.cpus: expected a number, got the string '1.5'"),
    ("gate: {metric: r2, min: .nan}", "4: stages.data.gate.min: expected a finite number, got nan"),
])
def test_values_the_loader_used_to_coerce_are_refused_as_the_schema_does(make_pipeline: MakePipeline, line: str,
                                                                          expected: str) -> None:
    message = error_of(make_pipeline, f"""
        stages:
          data:
            image: busybox
            {line}
            metrics: m.json
        """)
    assert message == expected


def test_a_whole_float_is_a_whole_number_for_both(make_pipeline: MakePipeline) -> None:
    path = make_pipeline("stages:\n  data: {image: busybox, retries: 2.0, resources: {cpus: 1}}\n")
    assert load_pipeline(path).stages["data"].retries == 2
    assert_schema_agrees(path)


def test_remote_block_is_read_with_its_defaults(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        stages:
          data: {image: busybox}
        remote:
          url: s3://my-bucket/team/pipe/
        """))
    remote = load_pipeline(path).remote
    assert remote is not None and (remote.url, remote.endpoint, remote.push) == ("s3://my-bucket/team/pipe/", None,
                                                                                  "auto")


@pytest.mark.parametrize(("block", "expected"), [
    ("url: s3://my-bucket/p/\n  secret_access_key: abc",
     "5: remote.secret_access_key: unknown key (known: url, endpoint, push)"),
    ("url: https://bucket/p/",
     "4: remote.url: not an S3 URL: write s3://bucket/prefix/ (credentials come from the AWS environment)"),
    ("url: s3://my-bucket/\n  endpoint: http://key:secret@127.0.0.1:9000",
     "5: remote.endpoint: not an http(s) URL without credentials, such as http://127.0.0.1:9000"),
    ("url: s3://my-bucket/\n  push: always", "5: remote.push: expected 'auto' or 'manual', got the string 'always'"),
])
def test_remote_block_refuses_credentials_and_bad_urls(make_pipeline: MakePipeline, block: str, expected: str
                                                       ) -> None:
    source = "stages:\n  data: {image: busybox}\nremote:\n  " + block + "\n"
    path = make_pipeline(source)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value).removeprefix(f"{path}:") == expected
    assert_schema_agrees(path)


def test_a_swarm_hands_off_through_the_remote_by_default(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(text("""
        executor: {kind: swarm, registry: "reg:5000"}
        remote: {url: "s3://team/pipe/", endpoint: "http://s3.example:9000"}
        stages:
          data: {image: busybox}
        """))
    assert_schema_agrees(path)
    store = load_pipeline(path).handoff_store
    assert store is not None and (store.url, store.endpoint) == ("s3://team/pipe/", "http://s3.example:9000")
    own = make_pipeline(text("""
        executor: {kind: swarm, registry: "reg:5000", store: {url: "s3://handoff/x/"}}
        remote: {url: "s3://team/pipe/"}
        stages:
          data: {image: busybox}
        """))
    assert load_pipeline(own).handoff_store.url == "s3://handoff/x/"  # type: ignore[union-attr]


def test_a_swarm_without_a_store_or_a_remote_says_so_in_one_line(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        executor: {kind: swarm, registry: "reg:5000"}
        stages:
          data: {image: busybox}
        """)
    assert message == ("1: executor.store: a swarm moves artifacts between nodes through an object store: add a "
                       "`remote:` block (used by default) or executor.store {url: s3://bucket/prefix/}")


def test_a_swarm_store_without_url_needs_a_remote(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        executor: {kind: swarm, registry: "reg:5000", store: {node_endpoint: "http://10.0.0.5:9000"}}
        stages:
          data: {image: busybox}
        """)
    assert message.startswith("1: executor.store: a swarm moves artifacts between nodes through an object store")
    path = make_pipeline(text("""
        executor: {kind: swarm, registry: "reg:5000", store: {node_endpoint: "http://10.0.0.5:9000"}}
        remote: {url: "s3://team/pipe/", endpoint: "http://s3.example:9000"}
        stages:
          data: {image: busybox}
        """))
    store = load_pipeline(path).handoff_store
    assert store is not None
    assert (store.url, store.endpoint, store.node_endpoint) == ("s3://team/pipe/", "http://s3.example:9000",
                                                                 "http://10.0.0.5:9000")
