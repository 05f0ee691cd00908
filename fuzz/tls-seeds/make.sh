#!/bin/sh
# Regenerates the throw-away TLS fixtures that make_seeds.py turns into tls_certificates seeds.
# Test material only: these keys protect nothing. Run from this directory; needs openssl.
set -eu
umask 077
o() { openssl "$@" 2>/dev/null; }
ext() { printf '%s\n' "$@" > ext.tmp; }
# CA (EC P-256) and a CRL revoking nothing
o genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
o req -x509 -new -key ca-key.pem -subj "/CN=fuzz CA" -days 36500 -out ca-cert.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
# server: EC P-256 PKCS#8, signed by the CA
o genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server-key.pem
o req -new -key server-key.pem -subj "/O=nbdcrypt fuzz/CN=localhost" -out server.csr
ext "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1"
o x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -set_serial 2 -days 36500 \
  -extfile ext.tmp -out server-cert.pem
# the same key as SEC1 ("EC PRIVATE KEY")
o ec -in server-key.pem -out server-key-sec1.pem
# RSA-2048 PKCS#1 ("RSA PRIVATE KEY"), self-signed
o genrsa -traditional -out rsa-key.pem 2048
o req -x509 -new -key rsa-key.pem -subj "/CN=rsa.localhost" -days 36500 -out rsa-cert.pem
# a CRL of the CA
printf 'V\t991231235959Z\t\t02\tunknown\t/CN=localhost\n' > index.txt
cat > ca.cnf <<'EOT'
[ca]
default_ca = d
[d]
database = index.txt
crlnumber = crlnumber
default_md = sha256
default_crl_days = 36500
EOT
echo 01 > crlnumber
o ca -config ca.cnf -gencrl -keyfile ca-key.pem -cert ca-cert.pem -out ca-crl.pem
# the certtool key whose scalar is 33 bytes (daemon/src/tls.rs unit test), with a certificate
cat > padded-key.pem <<'EOT'
-----BEGIN PRIVATE KEY-----
MIGUAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHoweAIBAQQhAK2Foqsj8hvnVYVk
lHhlFK5VsFA60ErP9efdVPTUcXTRoAoGCCqGSM49AwEHoUQDQgAEGXliAZYJte43
3mO20IQys32KWhK08aHXIgavnz1Od650H56MH9ftuRcv6f9nQGEFNcKGXCJuBQXj
xBr/mtcs+w==
-----END PRIVATE KEY-----
EOT
o req -x509 -new -key padded-key.pem -subj "/CN=padded.localhost" -days 36500 -out padded-cert.pem
rm -f ext.tmp server.csr index.txt* ca.cnf crlnumber* ca-key.pem
