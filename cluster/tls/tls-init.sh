#!/bin/sh
# One-shot, before Nginx starts (compose's tls-init service, as root in the platform image):
#   - a self-signed certificate for TLS_DOMAIN into the tls-certs volume when there is none, so that
#     Nginx can start before Let's Encrypt has issued one (the certbot service, profile
#     `letsencrypt`, replaces it). A certificate that is not self-signed is never touched; a
#     self-signed one is renewed when it expires within 30 days or names another domain;
#   - the htpasswd file guarding MLflow behind Nginx, from MLFLOW_BASIC_AUTH_USER and
#     MLFLOW_BASIC_AUTH_PASSWORD (SHA-512 crypt, written again on every start: a changed password
#     takes effect with `docker compose up -d`);
#   - a file in the ACME webroot that Nginx's health check fetches over plain HTTP.
set -eu

certs="${TLS_CERTS_DIR:-/etc/nginx/certs}"
auth="${HTPASSWD_DIR:-/etc/nginx/auth}"
webroot="${ACME_WEBROOT:-/var/www/certbot}"
domain="${TLS_DOMAIN:-localhost}"
# The nginx images' worker user (uid and gid 101) reads the htpasswd file on each request.
nginx_gid="${NGINX_GID:-101}"
: "${MLFLOW_BASIC_AUTH_PASSWORD:?MLFLOW_BASIC_AUTH_PASSWORD is not set}"

mkdir -p "$certs" "$auth" "$webroot/.well-known/acme-challenge"
printf 'ok\n' > "$webroot/.well-known/acme-challenge/nginx-health"
chmod -R a+rX "$webroot"

cert="$certs/fullchain.pem"
key="$certs/privkey.pem"
issue=no
if [ ! -s "$cert" ] || [ ! -s "$key" ]; then
    issue=yes
else
    subject="$(openssl x509 -noout -subject -nameopt RFC2253 -in "$cert" | sed 's/^subject=//')"
    issuer="$(openssl x509 -noout -issuer -nameopt RFC2253 -in "$cert" | sed 's/^issuer=//')"
    if [ "$subject" = "$issuer" ]; then
        if [ "$subject" != "CN=$domain" ] || ! openssl x509 -noout -checkend 2592000 -in "$cert" >/dev/null; then
            issue=yes
        fi
    fi
fi
if [ "$issue" = yes ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 365 \
        -subj "/CN=$domain" -addext "subjectAltName=DNS:$domain" \
        -keyout "$key.tmp" -out "$cert.tmp" 2>/dev/null
    chmod 600 "$key.tmp"
    chmod 644 "$cert.tmp"
    mv -f "$key.tmp" "$key"
    mv -f "$cert.tmp" "$cert"
    echo "tls-init: self-signed certificate for $domain written (valid 365 days)"
else
    echo "tls-init: keeping the certificate in $certs"
fi

hash="$(printf '%s' "$MLFLOW_BASIC_AUTH_PASSWORD" | openssl passwd -6 -stdin)"
printf '%s:%s\n' "${MLFLOW_BASIC_AUTH_USER:-mlflow}" "$hash" > "$auth/htpasswd.tmp"
chmod 640 "$auth/htpasswd.tmp"
chown "0:$nginx_gid" "$auth/htpasswd.tmp" 2>/dev/null || chmod 644 "$auth/htpasswd.tmp"
mv -f "$auth/htpasswd.tmp" "$auth/htpasswd"
echo "tls-init: htpasswd for ${MLFLOW_BASIC_AUTH_USER:-mlflow} written"
