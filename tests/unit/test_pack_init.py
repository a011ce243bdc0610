"""The pack's entry module on a ComfyUI without the V3 API: one clear log line, no traceback."""
import subprocess
import sys
import textwrap

from bench import comfy_env

LOAD_LIKE_COMFYUI = textwrap.dedent("""
    import importlib.util, logging, sys, types
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
    sys.modules["comfy_api"] = types.ModuleType("comfy_api")   # an old ComfyUI: no comfy_api.latest
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location(path.replace(".", "_x_"), path + "/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    print("MAPPINGS", module.NODE_CLASS_MAPPINGS, hasattr(module, "comfy_entrypoint"))
""")


def test_old_comfyui_gets_one_error_line_and_no_nodes():
    done = subprocess.run([sys.executable, "-c", LOAD_LIKE_COMFYUI, str(comfy_env.REPO_ROOT)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    errors = [l for l in done.stderr.splitlines() if l.startswith("ERROR")]
    assert len(errors) == 1, done.stderr
    assert f"needs ComfyUI >= {comfy_env.MIN_COMFYUI_VERSION}" in errors[0]
    assert "Traceback" not in done.stderr
    assert "MAPPINGS {} False" in done.stdout


def test_minimum_version_is_stated_once_for_pack_and_harness():
    init = (comfy_env.REPO_ROOT / "__init__.py").read_text()
    assert f'MIN_COMFYUI_VERSION = "{comfy_env.MIN_COMFYUI_VERSION}"' in init
    assert comfy_env.MIN_COMFYUI_VERSION in (comfy_env.REPO_ROOT / "README.md").read_text()
