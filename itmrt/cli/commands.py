"""Imports every CLI command module so each registers itself on the app."""

# The import order is the registration order, which is the order of the commands in `itmrt --help`:
# import sorting stays off here.
# isort: off
from itmrt.cli import eval_cmd  # noqa: F401
from itmrt.cli import export_cmd, check_cmd  # noqa: F401,E402
from itmrt.cli import infer_cmd, index_cmd  # noqa: F401,E402
from itmrt.cli import demo_cmd, train_cmd  # noqa: F401,E402
from itmrt.cli import calibrate_cmd, build_cmd, doctor_cmd  # noqa: F401,E402
from itmrt.cli import parity_cmd, bench_cmd, report_cmd  # noqa: F401,E402
from itmrt.cli import recipe_cmd, sample_data_cmd  # noqa: F401,E402
from itmrt.cli import serve_cmd, query_cmd  # noqa: F401,E402
from itmrt.cli import explain_cmd  # noqa: F401,E402
from itmrt.cli import audit_cmd  # noqa: F401,E402
# isort: on
