"""The HTTP protocols as clients use them: the JSON API with many texts, and the Open Inference Protocol
(KServe v2) through a standard v2 client (tritonclient) that knows nothing of driftserve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as v2
from tritonclient.utils import InferenceServerException

from tests.conftest import wait_for
from tests.integration.conftest import send_feedback

ROWS = [("I was charged twice", "billing"), ("The app keeps crashing", "bug")]


@pytest.fixture()
def labelled_domain(client, producer, stack, unique):
    domain = unique("proto")
    rows = [
        {"event_id": f"{domain}-{i}", "text": t, "label": lab, "domain": domain}
        for i, (t, lab) in enumerate(ROWS)
    ]
    send_feedback(producer, stack.settings.feedback_topic, rows)

    def known() -> bool:
        return (
            client.post("/v1/predict", json={"text": ROWS[0][0], "domain": domain}).json()["label"]
            == "billing"
        )

    wait_for(known, 15, what="the domain's labels")
    return domain


def test_json_api_accepts_many_texts(client, labelled_domain):
    r = client.post("/v1/predict", json={"texts": [t for t, _ in ROWS], "domain": labelled_domain})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [lab for _, lab in ROWS]
    assert len({p["request_id"] for p in preds}) == 2
    too_many = client.post("/v1/predict", json={"texts": ["x"] * 65})
    assert too_many.status_code == 413 and too_many.json()["error_type"] == "payload_too_large"
    both = client.post("/v1/predict", json={"text": "a", "texts": ["b"]})
    assert both.status_code == 422 and "exactly one" in both.json()["error"]


def test_standard_v2_client(stack, labelled_domain):
    client = v2.InferenceServerClient(url=stack.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("driftserve")
    meta = client.get_model_metadata("driftserve")
    assert meta["name"] == "driftserve" and meta["inputs"][0]["datatype"] == "BYTES"
    texts = np.array([t.encode() for t, _ in ROWS], dtype=np.object_)
    inp = v2.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=False)
    outputs = [v2.InferRequestedOutput(n, binary_data=False) for n in ("label", "probability", "scores")]
    result = client.infer("driftserve", [inp], outputs=outputs, parameters={"domain": labelled_domain})
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    assert labels == [lab for _, lab in ROWS]
    probs = result.as_numpy("probability")
    assert probs.dtype == np.float32 and np.all(probs > 0.5)
    scores = json.loads(result.as_numpy("scores")[0])
    assert set(scores) >= {"billing", "bug"}
    binary = v2.InferInput("text", [len(texts)], "BYTES")
    binary.set_data_from_numpy(texts, binary_data=True)  # the binary tensor extension
    again = client.infer("driftserve", [binary], outputs=outputs, parameters={"domain": labelled_domain})
    assert [x.decode() if isinstance(x, bytes) else x for x in again.as_numpy("label")] == labels
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("no-such-model", [inp])
    client.close()


def test_v2_bad_requests_get_4xx(client):
    ok_input = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}
    cases = [
        ({"inputs": [{**ok_input, "datatype": "FP32"}]}, 400),
        ({"inputs": [{**ok_input, "shape": [3]}]}, 400),
        ({"inputs": [{**ok_input, "data": [""], "shape": [1]}]}, 400),
        ({"inputs": []}, 400),
        ({"inputs": [ok_input], "bogus": 1}, 400),
    ]
    for body, status in cases:
        r = client.post("/v2/models/driftserve/infer", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]
    assert client.post("/v2/models/other/infer", json={"inputs": [ok_input]}).status_code == 404
    assert client.get("/v2/models/other").status_code == 404


def test_openapi_matches_what_is_served(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/feedback", "/v1/forget", "/v2/models/{name}/infer", "/v2/health/ready"):
        assert path in spec["paths"], path
    assert "PredictRequest" in json.dumps(spec["components"])
