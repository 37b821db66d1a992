"""Device profiles: every shipped one loads, aliases resolve, bad files give one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bim_export import cli
from bim_export.core.errors import InputError
from bim_export.deploy import profile_text, profiles
from bim_export.deploy.plausibility import implausible_figures
from bim_export.deploy.profiles import ALIASES, Profile, list_profiles, load_profile, load_profile_file

REQUIRED = {"host", "jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5"}


def _shipped(name: str) -> dict:
    return yaml.safe_load((profiles.profiles_dir() / f"{name}.yaml").read_text())


def _write(tmp_path: Path, data, name: str = "my-device") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------- shipped profiles


def test_shipped_profiles_cover_the_devices():
    names = set(list_profiles())
    assert REQUIRED <= names
    classes = {load_profile(n).device_class for n in names}
    assert {"cpu", "gpu", "mobile", "edge"} <= classes


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads(name):
    p = load_profile(name)
    assert p.name == name
    assert p.path.name == f"{name}.yaml"
    assert p.budgets.latency_ms > 0 and p.budgets.peak_memory_mb > 0 and p.budgets.model_size_mb > 0
    assert p.measured == (name == "host")
    if not p.measured:
        for precision in p.precisions:
            assert getattr(p.hardware.peak_gflops, precision) > 0
    assert (Path(profiles.resource_dir("targets")) / f"{p.target_script}.py").is_file()


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_resolves_to_its_canonical_name(alias):
    p = load_profile(alias)
    assert p.name == ALIASES[alias] != alias
    assert alias in profiles.aliases_of(p.name)


def test_the_documented_aliases_exist():
    assert {"jetson", "mobile", "edge-cpu", "server-gpu", "server-cpu"} <= set(ALIASES)
    assert ALIASES["jetson"] == "jetson-orin-nano" and ALIASES["edge-cpu"] == "raspberry-pi-5"
    assert load_profile("mobile").device_class == "mobile"
    assert load_profile("server-gpu").uses_gpu and not load_profile("server-cpu").uses_gpu


def test_user_copy_loads_by_path_with_its_own_name(tmp_path):
    path = _write(tmp_path, _shipped("raspberry-pi-5"), name="pi-in-the-barn")
    for arg in (path, str(path)):
        p = load_profile(arg)
        assert p.name == "pi-in-the-barn" and p.path == path
    assert p.budgets == load_profile("edge-cpu").budgets


def test_parity_defaults_and_tolerance_lookup(tmp_path):
    data = _shipped("raspberry-pi-5")
    del data["parity"]
    p = load_profile_file(_write(tmp_path, data))
    assert p.tolerance("int8").cosine == 0.995 and p.tolerance("int8").neighbour_agreement == 0.99
    assert load_profile("jetson").tolerance("fp32").cosine > 0.995


def test_format_profile_round_trips(tmp_path):
    p = load_profile("jetson")
    text = profile_text.format_profile(p)
    assert text.startswith("name: jetson-orin-nano\naliases: [jetson]")
    data = yaml.safe_load(text)
    for key in ("name", "aliases", "file"):
        data.pop(key)
    assert load_profile_file(_write(tmp_path, data, name="jetson-orin-nano")).model_dump() == p.model_dump()


def test_profile_list_table_names_every_profile_and_alias():
    text = profile_text.format_profile_list()
    for name in list_profiles():
        assert name in text
    for alias in ALIASES:
        assert alias in text
    assert "p90 <= 20 ms" in text  # the Pi's latency budget


def test_import_is_light():
    code = ("import sys, bim_export.deploy.profiles, bim_export.deploy.selector; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'numpy', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_phone_profiles_fix_their_batch_and_name_their_accelerators(tmp_path):
    android, iphone = load_profile("mobile"), load_profile("iphone")
    assert iphone.name == "iphone-15-pro" and iphone.target_script == "ios"
    assert android.batch_is_fixed and iphone.batch_is_fixed and not load_profile("jetson").batch_is_fixed
    assert android.execution_providers[0] == "NnapiExecutionProvider" and android.int8_preset == "nnapi"
    assert list(iphone.accelerators) == ["CoreMLExecutionProvider"]
    assert iphone.provider_options["CoreMLExecutionProvider"]["ModelFormat"] == "MLProgram"
    # the default follows the device class; a profile may say otherwise
    data = _shipped("android-snapdragon-8-gen-2")
    data.pop("fixed_batch")
    assert load_profile(_write(tmp_path, data, "phone")).batch_is_fixed
    data.update(fixed_batch=False)
    assert not load_profile(_write(tmp_path, data, "phone")).batch_is_fixed
    data.update(fixed_batch=True, dynamic_batch_file=True)
    assert load_profile(_write(tmp_path, data, "phone")).dynamic_batch_file


# -------------------------------------------------------------------------------- bad input


def _mutated(change) -> dict:
    data = copy.deepcopy(_shipped("jetson-orin-nano"))
    change(data)
    return data


BAD = {
    "negative latency": (lambda d: d["budgets"].update(latency_ms=-5),
                         "budgets.latency_ms must be > 0 (got -5)"),
    "zero size": (lambda d: d["budgets"].update(model_size_mb=0), "budgets.model_size_mb must be > 0 (got 0)"),
    "zero batch": (lambda d: d.update(batch=0), "batch must be > 0 (got 0)"),
    "wrong type": (lambda d: d.update(batch="one"), "batch must be an integer (got 'one')"),
    "wrong type nested": (lambda d: d["hardware"].update(mem_bandwidth_gbs="fast"),
                          "hardware.mem_bandwidth_gbs must be a number (got 'fast')"),
    "unknown key": (lambda d: d.update(latncy=3), "latncy is not a known field"),
    "unknown nested key": (lambda d: d["budgets"].update(latncy_ms=3),
                           "budgets.latncy_ms is not a known field; valid: "),
    "unknown precision": (lambda d: d.update(precisions=["fp32", "fp8"]),
                          "precisions[1] must be one of 'fp32', 'fp16' or 'int8' (got 'fp8')"),
    "unknown latency stat": (lambda d: d["budgets"].update(latency_stat="p95"),
                             "budgets.latency_stat must be one of 'p50', 'p90' or 'p99' (got 'p95')"),
    "unknown EP": (lambda d: d.update(execution_providers=["CudaExecutionProvider"]),
                   "execution_providers[0] is not an ONNX Runtime execution provider (got 'CudaExecutionProvider'); "
                   "did you mean CUDAExecutionProvider?"),
    "unknown EP far off": (lambda d: d.update(execution_providers=["CPUExecutionProvider", "Foo"]),
                           "execution_providers[1] is not an ONNX Runtime execution provider (got 'Foo'); "
                           "valid: ACLExecutionProvider"),
    "duplicate EP": (lambda d: d.update(execution_providers=["CPUExecutionProvider"] * 2),
                     "execution_providers lists an execution provider twice"),
    "no precisions": (lambda d: d.update(precisions=[]), "precisions must have at least 1 item(s) (got [])"),
    "missing field": (lambda d: d.pop("description"), "description is required"),
    "missing hardware": (lambda d: d.pop("hardware"), "hardware is required unless measured is true"),
    "peak for listed precision": (lambda d: d["hardware"]["peak_gflops"].pop("int8"),
                                  "hardware.peak_gflops.int8 is required because precisions lists int8"),
    "cosine above 1": (lambda d: d["parity"]["int8"].update(cosine=1.5),
                       "parity.int8.cosine must be <= 1 (got 1.5)"),
    "opset too old": (lambda d: d.update(opset=9), "opset must be >= 13 (got 9)"),
    "name mismatch": (lambda d: d.update(name="other"), "name must match the file name 'my-device' (got 'other')"),
    "two problems": (lambda d: (d.update(batch=0), d["budgets"].update(latency_ms=-1)),
                     "batch must be > 0 (got 0) (and 1 more)"),
    "options for an unlisted EP": (lambda d: d.update(provider_options={"CoreMLExecutionProvider": {"a": "b"}}),
                                   "provider_options.CoreMLExecutionProvider names an execution provider the profile "
                                   "does not list"),
    "figures for a non-accelerator": (lambda d: d.update(accelerators={"CUDAExecutionProvider": d["hardware"]}),
                                      "accelerators.CUDAExecutionProvider must be one of NnapiExecutionProvider, "
                                      "CoreMLExecutionProvider"),
    "dynamic copy of a dynamic model": (lambda d: d.update(dynamic_batch_file=True),
                                        "dynamic_batch_file needs a fixed batch (fixed_batch: true)"),
    "device with an unknown CPU flag": (lambda d: d["device"].update(cpu_flags=["avx9"]),
                                        "device.cpu_flags[0] is not a recorded CPU flag (got 'avx9')"),
    "device saying nothing": (lambda d: d.update(device={"logical_cores": 6}),
                              "device needs at least one of architecture, cpu, accelerator"),
    "device of an unknown architecture": (lambda d: d["device"].update(architecture="riscv64"),
                                          "device.architecture must be one of 'x86_64' or 'aarch64'"),
    "unknown memory type": (lambda d: d["hardware"].update(memory_type="LPDDR9"),
                            "hardware.memory_type must be one of 'DDR4'"),
    "unknown int8 preset": (lambda d: d.update(int8_preset="nnapi2"),
                            "int8_preset must be one of 'arm64', 'avx2', 'avx512', 'avx512_vnni', 'tensorrt' or "
                            "'nnapi' (got 'nnapi2')"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_profile_is_one_line_naming_file_field_value(tmp_path, case):
    change, expected = BAD[case]
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(InputError) as e:
        load_profile(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert expected in message, message
    assert "\n" not in message


def test_shipped_file_is_named_relative_to_profiles(tmp_path, monkeypatch):
    bad = _mutated(lambda d: d["budgets"].update(latency_ms=-5))
    folder = tmp_path / "profiles"
    folder.mkdir()
    _write(folder, bad, name="jetson-orin-nano")
    monkeypatch.setattr(profiles, "resource_dir", lambda name: folder)
    with pytest.raises(InputError, match=r"^profiles/jetson-orin-nano\.yaml: budgets\.latency_ms must be > 0 \(got -5\)$"):
        load_profile("jetson")


def test_broken_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "description: x\nbudgets:\n  latency_ms: [1, 2\nbatch: 1\n")
    with pytest.raises(InputError, match=r"my-device\.yaml: line \d+ broken YAML"):
        load_profile(path)


def test_broken_yaml_names_the_line_of_a_key_without_its_colon(tmp_path):
    lines = (profiles.profiles_dir() / "raspberry-pi-5.yaml").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("  memory_gb:"))
    lines[n] = lines[n].replace("memory_gb:", "memory_gb")  # yaml notices only on the next line
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"my-device\.yaml: line {n + 1} broken YAML: could not find expected ':'$"):
        load_profile(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    with pytest.raises(InputError, match="must be a mapping of fields"):
        load_profile(_write(tmp_path, text))


def test_file_name_must_make_a_folder_name(tmp_path):
    with pytest.raises(InputError, match=r"names its export folder.*\(got 'my device'\)"):
        load_profile(_write(tmp_path, _shipped("host"), name="my device"))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.yaml: profile file not found"):
        load_profile(tmp_path / "nope.yaml")


def test_unknown_name_lists_valid_and_close_matches():
    with pytest.raises(InputError) as e:
        load_profile("jetsn")
    message = str(e.value)
    assert message.startswith("unknown profile 'jetsn'; valid: ")
    assert "raspberry-pi-5" in message and "did you mean jetson" in message


def test_a_measured_profile_may_leave_hardware_out(tmp_path):
    data = _shipped("host")
    assert "hardware" not in data
    assert Profile.model_validate({**data, "name": "h"}).hardware is None


# ---------------------------------------------------------------------------------------- CLI


def test_cli_list(capsys):
    assert cli.main(["profiles", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_profiles())


@pytest.fixture
def calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BIM_EXPORT_CALIBRATION_DIR", str(tmp_path / "calibration"))
    return tmp_path / "calibration"


def test_cli_show_resolves_alias(capsys, calibration_dir):
    assert cli.main(["profiles", "show", "edge-cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("name: raspberry-pi-5\n") and "edge-cpu" in out


def test_cli_show_prints_the_absolute_path_and_the_calibration(tmp_path, capsys, calibration_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, _shipped("raspberry-pi-5"), name="barn-pi")
    assert cli.main(["profiles", "show", "barn-pi.yaml"]) == 0  # a relative path
    out = capsys.readouterr().out
    assert f"\nfile: {tmp_path / 'barn-pi.yaml'}\n" in out
    assert f"calibration: none ({calibration_dir.absolute() / 'barn-pi.json'} does not exist;" in out
    assert cli.main(["profiles", "show", "edge-cpu"]) == 0
    assert f"\nfile: {(profiles.profiles_dir() / 'raspberry-pi-5.yaml').resolve()}\n" in capsys.readouterr().out


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_hardware_figures_are_plausible(name):
    assert implausible_figures(load_profile(name)) == []


def test_cli_check_warns_on_implausible_figures_and_what_they_imply(tmp_path, capsys):
    data = _shipped("raspberry-pi-5")
    data["hardware"]["peak_gflops"]["fp32"] = 185600  # MFLOP/s written as GFLOP/s
    data["hardware"].update(power_w=6, mem_bandwidth_gbs=1700)
    path = _write(tmp_path, data, name="six-watt")
    assert cli.main(["profiles", "check", str(path)]) == 0  # valid, but said to be implausible
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (six-watt), 3 implausible figures\n"
    warnings = err.splitlines()
    assert all(w.startswith(f"warning: {path}: hardware.") for w in warnings) and len(warnings) == 3
    assert "peak_gflops.fp32: 185600 GFLOP/s on 6 W is 30,933 GFLOP/s per watt" in warnings[0]
    assert "185600 GFLOP/s on 4 cores is 46,400 GFLOP/s per core" in warnings[1]
    assert "1700 GB/s of LPDDR4X needs a 3,188-bit bus at its fastest 4266 MT/s" in warnings[2]
    # the accelerator figures of a phone are checked too
    data = _shipped("iphone-15-pro")
    data["accelerators"]["CoreMLExecutionProvider"]["peak_gflops"]["fp16"] = 17.5e6
    assert cli.main(["profiles", "check", str(_write(tmp_path, data, name="phone"))]) == 0
    assert "accelerators.CoreMLExecutionProvider.peak_gflops.fp16: " in capsys.readouterr().err


def test_cli_check_good_file(tmp_path, capsys):
    path = _write(tmp_path, _shipped("host"), name="lab-box")
    assert cli.main(["profiles", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (lab-box)\n" and err == ""


@pytest.mark.parametrize("argv_tail, expected", [
    (["check", "{bad}"], "budgets.latency_ms must be > 0 (got -5)"),
    (["show", "{bad}"], "budgets.latency_ms must be > 0 (got -5)"),
    (["show", "rasberry-pi-5"], "did you mean raspberry-pi-5"),
    (["check", "{missing}"], "profile file not found"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv_tail, expected):
    bad = _write(tmp_path, _mutated(lambda d: d["budgets"].update(latency_ms=-5)))
    argv = ["profiles", *(a.format(bad=bad, missing=tmp_path / "missing.yaml") for a in argv_tail)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err


# ------------------------------------------------------------------------------- registries


def test_a_registered_preset_provider_and_script_are_accepted(tmp_path):
    """A new quantization preset, execution provider or device script is one registration, which the
    schema then accepts; unregistered, the same names are rejected naming the field."""
    from bim_export.deploy.device_scripts import SCRIPTS, DeviceScript
    from bim_export.deploy.presets import PRESETS, QuantPreset
    from bim_export.deploy.providers import PROVIDERS, ExecutionProvider

    data = {**_shipped("raspberry-pi-5"), "int8_preset": "sdot8", "target_script": "edge_npu",
            "execution_providers": ["MyNpuExecutionProvider", "CPUExecutionProvider"]}
    path = _write(tmp_path, data)
    unknown = r"target_script must be one of 'cpu', .* or 'ios' \(got 'edge_npu'\) \(and 2 more\)$"
    with pytest.raises(InputError, match=unknown):  # the script, the preset and the EP
        load_profile(path)
    PRESETS.register(QuantPreset("sdot8", "a test's preset", static=True, native_cpus=()))
    SCRIPTS.register(DeviceScript("edge_npu", "onnxruntime", "a test's script"))
    PROVIDERS.register(ExecutionProvider("MyNpuExecutionProvider"))
    try:
        p = load_profile(path)
        assert (p.int8_preset, p.target_script, p.execution_providers[0]) == \
            ("sdot8", "edge_npu", "MyNpuExecutionProvider")
    finally:
        PRESETS.unregister("sdot8"), SCRIPTS.unregister("edge_npu"), PROVIDERS.unregister("MyNpuExecutionProvider")
    with pytest.raises(InputError, match=unknown):
        load_profile(path)


def test_unknown_target_script_names_the_registered_ones(tmp_path):
    path = _write(tmp_path, {**_shipped("raspberry-pi-5"), "target_script": "android"})
    with pytest.raises(InputError, match=r"target_script must be one of 'cpu', 'jetson', 'server_gpu', 'mobile' "
                                         r"or 'ios' \(got 'android'\)"):
        load_profile(path)
