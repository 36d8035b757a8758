#!/bin/sh
# make-certs.sh DIR HOST: a throwaway CA (DIR/ca.pem) and a certificate for HOST signed by
# it (DIR/receiver.pem, DIR/receiver.key), for the demo receiver only. HOST is a DNS
# name or an IPv4 address. Certificates already in DIR are kept.
set -eu
dir=${1:?usage: make-certs.sh DIR HOST}
host=${2:?usage: make-certs.sh DIR HOST}

if [ -s "$dir/ca.pem" ] && [ -s "$dir/receiver.pem" ] && [ -s "$dir/receiver.key" ]; then
	echo "certificates in $dir already made"
	exit 0
fi
case $host in
*[!0-9.]*) san="DNS:$host" ;;
*) san="IP:$host" ;;
esac

mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
	-subj "/CN=outbox demo CA" \
	-addext "basicConstraints=critical,CA:TRUE" \
	-addext "keyUsage=critical,keyCertSign,cRLSign" \
	-keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-subj "/CN=$host" -keyout "$work/receiver.key" -out "$work/receiver.csr" 2>/dev/null
cat >"$work/receiver.ext" <<EXT
subjectAltName = $san
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
EXT
openssl x509 -req -in "$work/receiver.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
	-CAcreateserial -days 365 -extfile "$work/receiver.ext" -out "$work/receiver.pem" 2>/dev/null

# The CA's key is thrown away: nothing else can ever be signed by this CA.
cp "$work/ca.pem" "$work/receiver.pem" "$work/receiver.key" "$dir/"
chmod 644 "$dir/ca.pem" "$dir/receiver.pem"
chmod 600 "$dir/receiver.key"
echo "made $dir/ca.pem and a certificate for $host"
