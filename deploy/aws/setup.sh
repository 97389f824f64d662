#!/usr/bin/env bash
# IAM and KMS for one deployment, as reviewable steps. Run it from an administrator's shell
# with the AWS CLI v2 configured; with DRY_RUN=1 (the default) it only writes the JSON
# documents into $OUT and prints the commands, so they can be reviewed first.
#
#   ACCOUNT=123456789012 REGION=us-east-1 MEASUREMENTS=state/eif/measurements.json \
#   SEALED=model.sealed ROLE=confidential-inference-parent DRY_RUN=0 deploy/aws/setup.sh
#
# What it creates:
#  1. the parent instance's role and instance profile: it may call kms:Decrypt on the key, and
#     nothing else (the relay forwards the enclave's attested Decrypt; it never sees the key);
#  2. the KMS key, whose policy (from `host kms-policy`) releases data keys only with a
#     Recipient attestation document of this image (ImageSha384 = PCR0, PCR1, PCR2) running
#     this model (PCR16), and lets the administrator administer it and seal models.
# The model owner then seals with `host seal --kms-key-id <alias>` (deploy/README.md).
set -euo pipefail
: "${ACCOUNT:?AWS account id}" "${REGION:?AWS region}" "${MEASUREMENTS:?nitro-cli measurements.json}"
: "${SEALED:?the sealed model (its header names the model SHA-256)}"
ROLE=${ROLE:-confidential-inference-parent}
ALIAS=${ALIAS:-alias/confidential-inference-model}
ADMIN=${ADMIN:-arn:aws:iam::${ACCOUNT}:root}
OUT=${OUT:-deploy-out}
DRY_RUN=${DRY_RUN:-1}
HOST=${HOST_BIN:-host}
mkdir -p "$OUT"

run() {
    printf '+ %s\n' "$*"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

cat >"$OUT/parent-trust.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
}
JSON

# The key policy: the enclave principal (the parent's role) may Decrypt only with an
# attestation document that matches the measurements and the model.
"$HOST" kms-policy --measurements "$MEASUREMENTS" --sealed "$SEALED" --account "$ACCOUNT" \
    --admin-principal "$ADMIN" --enclave-principal "arn:aws:iam::${ACCOUNT}:role/${ROLE}" \
    >"$OUT/key-policy.json"

run aws iam create-role --role-name "$ROLE" --assume-role-policy-document "file://$OUT/parent-trust.json"
run aws iam create-instance-profile --instance-profile-name "$ROLE"
run aws iam add-role-to-instance-profile --instance-profile-name "$ROLE" --role-name "$ROLE"

KEY_ID=REPLACE_WITH_KEY_ID
if [ "$DRY_RUN" = 0 ]; then
    KEY_ID=$(aws kms create-key --region "$REGION" --policy "file://$OUT/key-policy.json" \
        --description "confidential inference: model data keys" --query KeyMetadata.KeyId --output text)
    echo "created key $KEY_ID"
else
    echo "+ aws kms create-key --region $REGION --policy file://$OUT/key-policy.json --description ..."
fi
run aws kms create-alias --region "$REGION" --alias-name "$ALIAS" --target-key-id "$KEY_ID"

cat >"$OUT/parent-policy.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [{
    "Sid": "EnclaveKeyReleaseThroughTheRelay",
    "Effect": "Allow",
    "Action": "kms:Decrypt",
    "Resource": "arn:aws:kms:${REGION}:${ACCOUNT}:key/${KEY_ID}"
  }]
}
JSON
run aws iam put-role-policy --role-name "$ROLE" --policy-name kms-decrypt-for-enclave \
    --policy-document "file://$OUT/parent-policy.json"
echo "documents in $OUT; attach the instance profile $ROLE to the parent instance"
