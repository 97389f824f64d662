"""Drives mock-kms with Python's boto3, as users will: signed requests, JSON 1.1, errors.

Usage: python3 boto3_client.py ENDPOINT_URL. Prints "ok" and exits 0 when every check holds.
"""
import base64
import sys

import boto3
from botocore.exceptions import ClientError

endpoint = sys.argv[1]
kms = boto3.client(
    "kms",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="AKIDLOCALTEST",
    aws_secret_access_key="local-test-secret",
)

key_id = kms.create_key(Description="boto3")["KeyMetadata"]["KeyId"]
kms.create_alias(AliasName="alias/boto3", TargetKeyId=key_id)
assert kms.describe_key(KeyId="alias/boto3")["KeyMetadata"]["KeyId"] == key_id

ctx = {"model_name": "m"}
blob = kms.encrypt(KeyId=key_id, Plaintext=b"hello", EncryptionContext=ctx)["CiphertextBlob"]
assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"] == b"hello"

dk = kms.generate_data_key(KeyId="alias/boto3", KeySpec="AES_256")
assert len(dk["Plaintext"]) == 32
assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
assert len(kms.generate_random(NumberOfBytes=16)["Plaintext"]) == 16

try:
    kms.decrypt(CiphertextBlob=blob)  # context missing
    raise SystemExit("decrypt without the context succeeded")
except ClientError as e:
    assert e.response["Error"]["Code"] == "InvalidCiphertextException", e.response

try:
    kms.describe_key(KeyId="alias/nope")
    raise SystemExit("unknown alias found")
except ClientError as e:
    assert e.response["Error"]["Code"] == "NotFoundException", e.response

policy = kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
print("ok")
