"""query/ in rooms: the protocol's op table and the ops' handlers agree; the client never loads the server."""

from __future__ import annotations

import inspect
import subprocess
import sys

from query.ops import Ops
from query.protocol import OPS


def test_every_op_in_the_protocol_has_a_handler_and_no_handler_is_unreachable():
    handlers = {name[len("op_") :] for name, _ in inspect.getmembers(Ops, inspect.isfunction) if name.startswith("op_")}
    assert set(OPS) == handlers


def test_each_handler_takes_exactly_the_parameters_the_protocol_validates():
    # Ops.run calls handler(**request.params): a parameter the protocol accepts but the handler lacks
    # would be a TypeError (an internal error) at query time; one the handler has but the protocol
    # never passes is dead.  Required parameters have no default; optional ones do.
    for op, spec in OPS.items():
        params = dict(inspect.signature(getattr(Ops, "op_" + op)).parameters)
        params.pop("self")
        assert set(params) == set(spec), op
        for name, (_, required) in spec.items():
            has_default = params[name].default is not inspect.Parameter.empty
            assert has_default == (not required), (op, name)


def test_the_client_commands_do_not_import_the_server_module():
    code = (
        "import sys, query.cli; from click.testing import CliRunner; "
        "CliRunner().invoke(query.cli.main, ['--help']); "
        "print(sorted(m for m in sys.modules if m in ('query.server', 'query.ops')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
