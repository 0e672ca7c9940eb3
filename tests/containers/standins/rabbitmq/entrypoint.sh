#!/bin/sh
# The upstream image's RABBITMQ_DEFAULT_USER/PASS become the server's default user.
set -eu
{
  echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
  echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
} > /etc/rabbitmq/conf.d/15-default-user.conf
unset RABBITMQ_DEFAULT_USER RABBITMQ_DEFAULT_PASS
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
exec rabbitmq-server
