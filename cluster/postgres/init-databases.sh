#!/usr/bin/env bash
# Run by the official postgres image on its first start (an empty data volume), from
# /docker-entrypoint-initdb.d: the databases of MLflow's tracking store and of the platform
# (training jobs, predictions, feedback). Each is created only when missing, so the script is safe
# to run again by hand: `docker compose exec postgres bash /docker-entrypoint-initdb.d/10-databases.sh`.
set -euo pipefail

for database in ${PLATFORM_DATABASES:-mlflow ray_cluster}; do
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres --set db="$database" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
done
