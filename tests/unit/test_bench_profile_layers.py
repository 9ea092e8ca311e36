"""The single-row profile's split by layer (benchmarks/bulk_profile.py): what the note on where a
lone request's time goes is read from."""

from __future__ import annotations

from benchmarks.bulk_profile import profile_layers

LOOP = "Thread.run (threading.py:982);run_once (asyncio/base_events.py:1922)"
SERVE = "Replica._wrap_request (ray/serve/_private/replica.py:2514)"
STARLETTE = "Starlette.__call__ (starlette/applications.py:96)"
OURS = "Ingress.predict (serve_apps/ingress.py:317)"
LOG = "Logger._log (logging/__init__.py:1634)"
MODEL = "TabularMLP.forward (jobs/model.py:39);linear (torch/nn/functional.py:1)"
NUMPY = "nan_to_num (numpy/_core/_type_check_impl.py:480)"


def test_each_sample_goes_to_its_innermost_layer_and_the_shares_add_up():
    raw = "\n".join(
        [
            f"{LOOP};{SERVE};{STARLETTE};{OURS};{MODEL} 3",  # the model, called by our code
            f"{LOOP};{OURS};{NUMPY} 1",  # numpy's _core is not the platform's core/
            f"{LOOP};{SERVE};{LOG} 2",  # Serve's access log: logging's own
            f"{LOOP};{SERVE} 1",
            f"{LOOP};{STARLETTE};{OURS};json.dumps (json/__init__.py:231) 2",  # the standard library for us
            f"{LOOP} 1",
        ]
    )
    layers = profile_layers(raw)
    assert layers == {
        "model and preprocessing": 0.4,
        "logging": 0.2,
        "platform code": 0.2,
        "Ray Serve": 0.1,
        "event loop and threads": 0.1,
    }
    assert abs(sum(layers.values()) - 1) < 1e-9


def test_a_stack_of_no_known_layer_is_other_and_no_samples_is_no_shares():
    assert profile_layers("main (python.c:1);PyRun (pythonrun.c:2) 3") == {"other": 1.0}
    assert profile_layers("") == {}
