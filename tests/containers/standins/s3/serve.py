"""moto's server as the stack's S3 server, with identities enforced as SeaweedFS enforces them.

`weed mini` makes the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY pair its environment gives
into an admin identity and serves an IAM API on the S3 port. Here that pair becomes an IAM
user with a policy allowing everything, and moto checks every request's signature and the
signer's policies (INITIAL_NO_AUTH_ACTION_COUNT=0): a key s3-init creates can do only what
its policy allows. IAM calls reach the same port, as they do on SeaweedFS.
"""

import json
import os

from moto.core import DEFAULT_ACCOUNT_ID
from moto.iam.models import iam_backends
from moto.server import main

iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
iam.create_user("us-east-1", "admin")
key = iam.create_access_key("admin")
key.access_key_id = os.environ["AWS_ACCESS_KEY_ID"]
key.secret_access_key = os.environ["AWS_SECRET_ACCESS_KEY"]
everything = {"Effect": "Allow", "Action": "*", "Resource": "*"}
iam.put_user_policy(
    "admin", "admin", json.dumps({"Version": "2012-10-17", "Statement": [everything]})
)
main(["-H", "0.0.0.0", "-p", "8333"])
