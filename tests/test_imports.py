"""The core, the trigger and the aggregator must load neither TensorFlow nor any cloud SDK."""

import subprocess
import sys

# google and google.cloud alone are namespace packages that installed SDKs register at startup.
HEAVY = ("tensorflow", "keras", "boto3", "botocore", "google.cloud", "functions_framework", "sklearn", "matplotlib")


def test_core_trigger_aggregator_import_no_tensorflow_or_sdk():
    code = (
        "import sys\n"
        "import fedkeeper.core.config, fedkeeper.core.blob, fedkeeper.core.aggregate, fedkeeper.core.keys\n"
        "import fedkeeper.core.rounds, fedkeeper.store, fedkeeper.store.local\n"
        "import fedkeeper.functions.trigger, fedkeeper.functions.aggregator, fedkeeper.runtime.local\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {[h.split('.')[0] for h in HEAVY]!r} "
        "and (m.split('.')[0] != 'google' or m.startswith('google.cloud.'))]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def _new_packages(modules: str) -> set[str]:
    """Top-level non-stdlib packages that importing `modules` loads, besides numpy and fedkeeper."""
    code = (
        "import sys; before = set(sys.modules)\n"
        f"import {modules}\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "std = set(sys.stdlib_module_names)\n"
        "print(','.join(sorted(m for m in new if m not in std and m not in ('numpy', 'fedkeeper') and not m.startswith('_'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


def test_core_imports_only_numpy_and_stdlib():
    assert _new_packages("fedkeeper.core.blob, fedkeeper.core.aggregate, fedkeeper.core.keys, fedkeeper.core.rounds") == set()


def test_config_schema_adds_only_pydantic():
    # The config schema is pydantic models; pydantic brings its own small helpers and nothing else.
    assert _new_packages("fedkeeper.core.config") <= {"pydantic", "pydantic_core", "annotated_types",
                                                      "typing_extensions", "typing_inspection"}
