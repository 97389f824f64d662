#!/usr/bin/env bash
# IAM and KMS for one deployment, as reviewable steps, for the two parties in their two
# accounts (docs/security.md, "Key ownership"): the key lives in the MODEL OWNER's account;
# the parent instance's role, in the OPERATOR's account, may only Decrypt for the attested
# enclave. Each step runs with that party's own credentials (e.g. AWS_PROFILE). With DRY_RUN=1
# (the default) a step only writes its JSON documents into $OUT and prints the commands.
#
#   1. operator:  OPERATOR_ACCOUNT=222222222222 REGION=us-east-1 deploy/aws/setup.sh role
#   2. owner:     OWNER_ACCOUNT=111111111111 OPERATOR_ACCOUNT=222222222222 REGION=us-east-1 \
#                 MEASUREMENTS=measurements.json MODEL=model.gguf deploy/aws/setup.sh key
#                 (prints the key ARN; the owner then seals: host seal --kms-key-id ARN …)
#   3. operator:  OPERATOR_ACCOUNT=… REGION=… KEY_ARN=arn:aws:kms:… deploy/aws/setup.sh allow
#
# What it creates:
#  role:  the parent instance's role and instance profile (no permissions yet);
#  key:   the KMS key in the owner's account, whose policy (from `host kms-policy`) lets the
#         owner administer it and seal, and lets the parent role Decrypt only with a Recipient
#         attestation document of this image (ImageSha384 = PCR0, PCR1, PCR2) running this
#         model (PCR16). Nobody in the operator's account may CreateGrant, PutKeyPolicy,
#         ReEncrypt or Decrypt without attestation. AWS checks at CreateKey that the role of
#         step 1 exists, hence the order. With IMMUTABLE=1 (required when owner and operator
#         share an account) nobody administers the key, ever;
#  allow: the role's own IAM policy, which a cross-account Decrypt needs besides the key
#         policy: kms:Decrypt on that one key, and nothing else.
set -euo pipefail
STEP=${1:?usage: setup.sh role|key|allow}
: "${REGION:?AWS region}" "${OPERATOR_ACCOUNT:?account id of the operator (the parent instance)}"
ROLE=${ROLE:-confidential-inference-parent}
ROLE_ARN=arn:aws:iam::${OPERATOR_ACCOUNT}:role/${ROLE}
ALIAS=${ALIAS:-alias/confidential-inference-model}
OUT=${OUT:-deploy-out}
DRY_RUN=${DRY_RUN:-1}
HOST=${HOST_BIN:-host}
mkdir -p "$OUT"

run() {
    printf '+ %s\n' "$*"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

case "$STEP" in
role)
    cat >"$OUT/parent-trust.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
}
JSON
    run aws iam create-role --role-name "$ROLE" --assume-role-policy-document "file://$OUT/parent-trust.json"
    run aws iam create-instance-profile --instance-profile-name "$ROLE"
    run aws iam add-role-to-instance-profile --instance-profile-name "$ROLE" --role-name "$ROLE"
    echo "role $ROLE_ARN: give it to the model owner for step 2 (key)"
    ;;
key)
    : "${OWNER_ACCOUNT:?account id of the model owner}" "${MEASUREMENTS:?nitro-cli measurements.json}"
    : "${MODEL:?the model file (its SHA-256 goes into PCR16)}"
    OWNER=${OWNER:-arn:aws:iam::${OWNER_ACCOUNT}:root}
    IMMUTABLE_FLAG=()
    if [ "${IMMUTABLE:-0}" = 1 ]; then IMMUTABLE_FLAG=(--immutable); fi
    "$HOST" kms-policy --measurements "$MEASUREMENTS" --model-sha256 "$(sha256sum "$MODEL" | cut -d' ' -f1)" \
        --owner-principal "$OWNER" --enclave-principal "$ROLE_ARN" "${IMMUTABLE_FLAG[@]}" \
        >"$OUT/key-policy.json"
    BYPASS=()
    if [ "${IMMUTABLE:-0}" = 1 ]; then BYPASS=(--bypass-policy-lockout-safety-check); fi
    KEY_ARN=REPLACE_WITH_KEY_ARN
    if [ "$DRY_RUN" = 0 ]; then
        KEY_ARN=$(aws kms create-key --region "$REGION" --policy "file://$OUT/key-policy.json" "${BYPASS[@]}" \
            --description "confidential inference: model data keys" --query KeyMetadata.Arn --output text)
        echo "created key $KEY_ARN"
    else
        echo "+ aws kms create-key --region $REGION --policy file://$OUT/key-policy.json ${BYPASS[*]} --description ..."
    fi
    if [ "${IMMUTABLE:-0}" != 1 ]; then
        run aws kms create-alias --region "$REGION" --alias-name "$ALIAS" --target-key-id "$KEY_ARN"
    fi
    echo "key $KEY_ARN: seal with host seal --kms-key-id $KEY_ARN, and give the ARN to the operator for step 3 (allow)"
    ;;
allow)
    : "${KEY_ARN:?key ARN of the model owner (step 2)}"
    cat >"$OUT/parent-policy.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [{
    "Sid": "EnclaveKeyReleaseThroughTheRelay",
    "Effect": "Allow",
    "Action": "kms:Decrypt",
    "Resource": "${KEY_ARN}"
  }]
}
JSON
    run aws iam put-role-policy --role-name "$ROLE" --policy-name kms-decrypt-for-enclave \
        --policy-document "file://$OUT/parent-policy.json"
    echo "documents in $OUT; attach the instance profile $ROLE to the parent instance"
    ;;
*)
    echo "usage: setup.sh role|key|allow" >&2
    exit 2
    ;;
esac
