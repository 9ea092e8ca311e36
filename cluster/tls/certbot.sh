#!/bin/sh
# Let's Encrypt for the Nginx edge: compose's certbot service (profile `letsencrypt`, certbot image).
# Obtains a certificate for TLS_DOMAIN with the webroot method (Nginx answers the challenge from the
# acme-webroot volume on port 80), copies it into the tls-certs volume that Nginx reads, then tries
# a renewal every 12 hours; Nginx reloads every NGINX_RELOAD_INTERVAL_S and picks the new files up.
#
# `certbot.sh deploy-hook` is what certbot runs after each issuance or renewal (RENEWED_LINEAGE is
# /etc/letsencrypt/live/<domain>).
set -eu

certs="${TLS_CERTS_DIR:-/etc/nginx/certs}"
webroot="${ACME_WEBROOT:-/var/www/certbot}"
hook="/bin/sh $0 deploy-hook"

install_certificate() {
    lineage="$1"
    # Both files are replaced by a rename, the key first: a reload never reads half a file.
    install -m 644 "$lineage/fullchain.pem" "$certs/fullchain.pem.new"
    install -m 600 "$lineage/privkey.pem" "$certs/privkey.pem.new"
    mv -f "$certs/privkey.pem.new" "$certs/privkey.pem"
    mv -f "$certs/fullchain.pem.new" "$certs/fullchain.pem"
    echo "certbot: installed the certificate of $lineage for Nginx"
}

if [ "${1:-}" = deploy-hook ]; then
    install_certificate "${RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE for deploy hooks}"
    exit 0
fi

: "${TLS_DOMAIN:?set TLS_DOMAIN in .env to the public DNS name of this host}"
: "${LETSENCRYPT_EMAIL:?set LETSENCRYPT_EMAIL in .env: the ACME account and its expiry notices use it}"
case "$TLS_DOMAIN" in
    localhost | *.localhost | *.local | *.internal)
        echo "certbot: $TLS_DOMAIN is not a public name; Let's Encrypt cannot validate it" >&2
        exit 2
        ;;
esac
staging=""
if [ "${LETSENCRYPT_STAGING:-false}" = true ]; then
    staging="--staging"
fi

# shellcheck disable=SC2086  # $staging is empty or one flag
if ! certbot certonly --webroot --webroot-path "$webroot" --domain "$TLS_DOMAIN" \
    --email "$LETSENCRYPT_EMAIL" --agree-tos --no-eff-email --non-interactive \
    --keep-until-expiring --deploy-hook "$hook" $staging; then
    # Let's Encrypt limits failed validations (5 per hour and name): wait before compose restarts us.
    echo "certbot: could not obtain a certificate for $TLS_DOMAIN; retrying in an hour" >&2
    sleep 3600
    exit 1
fi
# A certificate issued earlier is not re-issued (--keep-until-expiring), so no hook ran: install
# it anyway, the volume may hold tls-init's self-signed one.
install_certificate "/etc/letsencrypt/live/$TLS_DOMAIN"

while :; do
    sleep 43200
    certbot renew --webroot --webroot-path "$webroot" --deploy-hook "$hook" --quiet \
        || echo "certbot: renewal failed; next try in 12 hours" >&2
done
