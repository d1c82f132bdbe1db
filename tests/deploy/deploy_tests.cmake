# deploy/kubernetes, checked offline by pytest (no cluster, no registry):
#  - deploy_kubernetes_manifests: strict schema validation (kubernetes-validate,
#    pinned in scripts/requirements.txt), the kustomizations' file lists, and
#    what broker and workers must agree on, raw and rendered (kubectl
#    kustomize; those cases skip, saying so, where kubectl is not installed);
#  - deploy_shipped_broker_config: the ConfigMap's wbrokerd.toml and the probe
#    and wait-for-broker commands, run against the wbrokerd/wbrokerctl built here.
foreach(suite kubernetes_manifests shipped_broker_config)
  wb_add_pytest(deploy_${suite} tests/deploy/test_${suite}.py LABELS deploy TIMEOUT 300
                ENV "WBROKERD=$<TARGET_FILE:wbrokerd>;WBROKERCTL=$<TARGET_FILE:wbrokerctl>")
endforeach()
