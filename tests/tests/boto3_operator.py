"""Plays the operator with Python's boto3 against mock-kms and a key policy from
`host kms-policy`: with the sealed header's wrapped data key in hand, each of the operator's
principals tries Decrypt without a Recipient, a grant to itself, a rewritten key policy and
ReEncrypt to a key of its own. Every attempt must be refused with AccessDeniedException.

Usage: python3 boto3_operator.py ENDPOINT_URL CASE_JSON, where CASE_JSON holds "key_arn",
"wrapped_key" (base64), "context" and "principals" ({access key id: principal ARN}).
Prints "ok" and exits 0 when every check holds.
"""
import base64
import json
import sys

import boto3
from botocore.exceptions import ClientError

endpoint = sys.argv[1]
case = json.loads(sys.argv[2])
blob = base64.b64decode(case["wrapped_key"])


def client(access_key_id):
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key_id,
        aws_secret_access_key="local-test-secret",
    )


def refused(what, call):
    try:
        call()
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if code != "AccessDeniedException":
            raise SystemExit(f"{what}: {code}, expected AccessDeniedException")
        return
    raise SystemExit(f"{what} succeeded")


for access_key_id, arn in case["principals"].items():
    kms = client(access_key_id)
    key = case["key_arn"]
    refused(f"{arn}: Decrypt without Recipient", lambda: kms.decrypt(
        CiphertextBlob=blob, EncryptionContext=case["context"], KeyId=key))
    refused(f"{arn}: CreateGrant", lambda: kms.create_grant(
        KeyId=key, GranteePrincipal=arn, Operations=["Decrypt"]))
    anything = {"Statement": [{"Effect": "Allow", "Principal": {"AWS": arn},
                               "Action": "kms:*", "Resource": "*"}]}
    refused(f"{arn}: PutKeyPolicy", lambda: kms.put_key_policy(
        KeyId=key, PolicyName="default", Policy=json.dumps(anything)))
    own = kms.create_key()["KeyMetadata"]["Arn"]
    refused(f"{arn}: ReEncrypt", lambda: kms.re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext=case["context"], DestinationKeyId=own))

try:
    client("AKIDSTRANGER").describe_key(KeyId=case["key_arn"])
    raise SystemExit("an unmapped access key was served")
except ClientError as e:
    assert e.response["Error"]["Code"] == "UnrecognizedClientException", e.response
print("ok")
