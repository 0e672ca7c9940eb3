#!/bin/sh
# s3-init (docker-compose.yml): the bucket, and the key the services sign with. Runs on every
# `docker compose up`, with the S3 server's admin key (S3_ACCESS_KEY, S3_SECRET_KEY), through
# the IAM API SeaweedFS serves on its S3 port:
# - creates the bucket when it is missing;
# - creates the user $APP_USER when missing and puts its policy: the objects of this bucket
#   and their listing, reading (only) the buckets TERMTUNE_ALLOWED_BUCKETS names for datasets,
#   nothing else (no other bucket, no creating or deleting buckets, no IAM);
# - keeps the key in $CREDENTIALS while the server still knows it; else deletes the user's
#   keys, creates one and writes it there, a shared-credentials file only the services' user
#   (uid 10001) reads, replaced in one rename.
set -eu
: "${TERMTUNE_BUCKET:?}" "${APP_USER:=termtune-app}" "${CREDENTIALS:=/run/termtune-s3/credentials}"

aws s3api head-bucket --bucket "$TERMTUNE_BUCKET" >/dev/null 2>&1 \
  || aws s3api create-bucket --bucket "$TERMTUNE_BUCKET" >/dev/null

aws iam get-user --user-name "$APP_USER" >/dev/null 2>&1 \
  || aws iam create-user --user-name "$APP_USER" >/dev/null
bucket="arn:aws:s3:::$TERMTUNE_BUCKET"
readable=""
for name in $(printf '%s' "${TERMTUNE_ALLOWED_BUCKETS:-}" | tr ',' ' '); do
  readable="$readable, \"arn:aws:s3:::$name\", \"arn:aws:s3:::$name/*\""
done
[ -z "$readable" ] || readable=",
    {\"Effect\": \"Allow\", \"Resource\": [${readable#, }],
     \"Action\": [\"s3:ListBucket\", \"s3:GetObject\"]}"
aws iam put-user-policy --user-name "$APP_USER" --policy-name termtune-bucket \
  --policy-document "{\"Version\": \"2012-10-17\", \"Statement\": [
    {\"Effect\": \"Allow\", \"Resource\": \"$bucket\",
     \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\"]},
    {\"Effect\": \"Allow\", \"Resource\": \"$bucket/*\",
     \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\"]}$readable]}"

keys=$(aws iam list-access-keys --user-name "$APP_USER" \
  --query 'AccessKeyMetadata[].AccessKeyId' --output text)
have=$(sed -n 's/^aws_access_key_id *= *//p' "$CREDENTIALS" 2>/dev/null || true)
for key in $keys; do
  if [ "$key" = "$have" ]; then
    echo "s3-init: bucket $TERMTUNE_BUCKET; $APP_USER keeps its key $have"
    exit 0
  fi
done
for key in $keys; do
  [ "$key" = None ] || aws iam delete-access-key --user-name "$APP_USER" --access-key-id "$key"
done
created=$(aws iam create-access-key --user-name "$APP_USER" \
  --query 'AccessKey.[AccessKeyId,SecretAccessKey]' --output text)
# shellcheck disable=SC2086 # two words: the key's id and its secret
set -- $created
umask 077
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$1" "$2" >"$CREDENTIALS.new"
chown 10001:10001 "$CREDENTIALS.new"
mv "$CREDENTIALS.new" "$CREDENTIALS"
echo "s3-init: bucket $TERMTUNE_BUCKET; $APP_USER has a new key $1"
