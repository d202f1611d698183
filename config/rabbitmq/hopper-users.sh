#!/bin/sh
# Least-privilege RabbitMQ users for one Hopper job: one for the dispatcher, one for its
# consumers, each with rights on that job's exchange and queues only (hopper.<job>.*) and
# only the reads its side does. Neither can touch another job, amq.default or any other
# queue of the virtual host.
#
#   hopper-users.sh add JOB [VHOST]     create hopper-JOB-dispatcher and hopper-JOB-consumer
#                                       and print their passwords (or take them from
#                                       HOPPER_DISPATCHER_PASSWORD and HOPPER_CONSUMER_PASSWORD)
#   hopper-users.sh remove JOB [VHOST]  delete both users
#   hopper-users.sh rights JOB          print the rights, as rabbitmqctl set_permissions takes them
#
# Needs rabbitmqctl on a broker node (RABBITMQCTL names another command, for example
# "docker compose exec -T rabbitmq rabbitmqctl"). VHOST defaults to /.
#
# The rights, and why each side needs them (RabbitMQ checks configure, write and read per
# exchange or queue name):
#   configure  both sides declare the job's exchange, queues and bindings, so either may
#              start first: ^hopper\.JOB\.
#   write      publishing goes through the job's exchange (hopper.JOB.exchange), and binding a
#              queue to it needs write on the queue: ^hopper\.JOB\.
#   read       the dispatcher reads replies and may look at every queue; a consumer reads
#              chunks. Binding needs read on the exchange, and declaring a queue that
#              dead-letters (chunks, retry.*) needs read on it, so a consumer has those, and
#              not replies or dead.
set -eu

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
action=$1
job=$2
vhost=${3:-/}
case $job in
    *[!a-z0-9-]* | "") echo "hopper-users.sh: job name $job: a-z, 0-9 and - only (as in the job file)" >&2; exit 2 ;;
esac
ctl=${RABBITMQCTL:-rabbitmqctl}
any="^hopper\\.$job\\."
consumer_read="^hopper\\.$job\\.(chunks|retry\\..+|exchange)\$"
dispatcher=hopper-$job-dispatcher
consumer=hopper-$job-consumer

password() {
    head -c 24 /dev/urandom | base64 | tr -d '/+=' | cut -c1-24
}

# add_user NAME PASSWORD CONFIGURE WRITE READ: the password goes on stdin, never on a command
# line another user could read in the process list.
add_user() {
    printf '%s\n' "$2" | $ctl add_user "$1" >/dev/null
    $ctl set_permissions -p "$vhost" "$1" "$3" "$4" "$5" >/dev/null
}

case $action in
    add)
        dp=${HOPPER_DISPATCHER_PASSWORD:-$(password)}
        cp=${HOPPER_CONSUMER_PASSWORD:-$(password)}
        add_user "$dispatcher" "$dp" "$any" "$any" "$any"
        add_user "$consumer" "$cp" "$any" "$any" "$consumer_read"
        echo "$dispatcher $dp"
        echo "$consumer $cp"
        ;;
    remove)
        for u in "$dispatcher" "$consumer"; do
            $ctl delete_user "$u" >/dev/null 2>&1 || true
        done
        ;;
    rights)
        echo "$dispatcher configure=$any write=$any read=$any"
        echo "$consumer configure=$any write=$any read=$consumer_read"
        ;;
    *) usage ;;
esac
