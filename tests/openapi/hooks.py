"""Schemathesis hooks for the gateway's OpenAPI check (run.sh sets SCHEMATHESIS_HOOKS).

`POST {base}/_provider-results` takes NDJSON, which Schemathesis cannot write on its
own: the document describes the body as an array (one item per line), and this
serializer writes each generated item as a JSON line. A generated value that is not
an array is written as one line, so that the gateway's refusal of it is checked too;
a string (the per-task result route documents its NDJSON body as one) as it is.
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, str):
        return value.encode()
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()
