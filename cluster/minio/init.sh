#!/bin/sh
# One-shot set-up of the object store, run by compose's minio-init service (minio/mc image) on
# every start; each step is a no-op when already done.
#   - creates the buckets named as arguments on `minio`, and the replicated ones on `minio-replica`;
#   - turns on versioning for the replicated buckets on both sides (MinIO replicates versions);
#   - adds a replication rule per replicated bucket, minio -> minio-replica: new objects, deletes,
#     delete markers and the objects already there.
# Loki's and Tempo's buckets are not replicated (nor versioned): their data is disposable, and
# their compactors delete constantly, which versioning would keep forever.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
replicated="${MINIO_REPLICATED_BUCKETS:-mlflow datasets ray}"

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc alias set replica http://minio-replica:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"

for bucket in "$@"; do
    mc mb --ignore-existing "local/$bucket"
done

for bucket in $replicated; do
    mc mb --ignore-existing "local/$bucket" "replica/$bucket"
    mc version enable "local/$bucket"
    mc version enable "replica/$bucket"
    # `mc replicate ls` fails on a bucket without replication rules.
    if mc replicate ls "local/$bucket" >/dev/null 2>&1; then
        echo "replication of $bucket: already configured"
    else
        mc replicate add "local/$bucket" --remote-bucket "replica/$bucket" --priority 1 \
            --replicate "delete,delete-marker,existing-objects"
    fi
done
echo "minio-init: buckets $* ready; replicated to minio-replica: $replicated"
