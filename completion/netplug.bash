# bash completion for netplug (libvirt-netplug)          -*- shell-script -*-
# Installed by the Debian package into /usr/share/bash-completion/completions/netplug; from a
# checkout: source completion/netplug.bash. tests/unit/test_cli.py keeps it in step with the
# command's own options.

_netplug_options()
{
    case $1 in
        plan) echo "--config --domain-xml --network-xml --op" ;;
        install-hooks) echo "--config --hooks-dir --json --keep-paths --python --state-dir" ;;
        uninstall-hooks) echo "--hooks-dir --json" ;;
        hook) echo "--config --hooks-dir --state-dir" ;;
        agent) echo "--config --connect --debounce --hooks-dir --metrics-file --min-interval --resync-interval --state-dir --verbose" ;;
        reconcile) echo "--config --connect --domain --dry-run --hooks-dir --json --metrics-file --no-guest-query --state-dir --verbose" ;;
        status) echo "--config --connect --hooks-dir --json --no-guest-query --state-dir --verbose" ;;
        doctor) echo "--config --connect --hooks-dir --json --no-guest-query --state-dir" ;;
        check-config) echo "--config --connect --hooks-dir --json --no-libvirt --state-dir --verbose --xml" ;;
    esac
}

_netplug()
{
    local cur prev words cword
    _init_completion || return

    local commands="plan install-hooks uninstall-hooks hook agent reconcile status doctor check-config"
    local i command=""
    for ((i = 1; i < cword; i++)); do
        if [[ ${words[i]} != -* ]]; then
            command=${words[i]}
            break
        fi
    done

    case $prev in
        --config | --domain-xml | --network-xml | --metrics-file | --xml)
            _filedir
            return
            ;;
        --state-dir | --hooks-dir)
            _filedir -d
            return
            ;;
        --python)
            _filedir
            return
            ;;
        --op)
            COMPREPLY=($(compgen -W "start started reconnect stopped release prepare migrate restore" -- "$cur"))
            return
            ;;
        --domain)
            COMPREPLY=($(compgen -W "$(virsh list --name 2>/dev/null)" -- "$cur"))
            return
            ;;
        --connect | -c | --debounce | --min-interval | --resync-interval)
            return
            ;;
    esac

    if [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur"))
        return
    fi
    if [[ $command == hook && $cur != -* ]]; then
        COMPREPLY=($(compgen -W "qemu network" -- "$cur"))
        return
    fi
    COMPREPLY=($(compgen -W "$(_netplug_options "$command") --help" -- "$cur"))
} &&
    complete -F _netplug netplug

# ex: filetype=sh
