# deploy/kubernetes, checked offline by pytest (no cluster, no registry):
#  - deploy_kubernetes_manifests: strict schema validation (kubernetes-validate,
#    pinned in scripts/requirements.txt), the kustomizations' file lists, and
#    what broker and workers must agree on, raw and rendered (kubectl
#    kustomize; those cases skip, saying so, where kubectl is not installed);
#  - deploy_shipped_broker_config: the ConfigMap's wbrokerd.toml and the probe
#    and wait-for-broker commands, run against the wbrokerd/wbrokerctl built here.
set(WBROKER_DEPLOY_PYTHON "${WBROKER_PYTHON}")
if(NOT WBROKER_DEPLOY_PYTHON)
  set(WBROKER_DEPLOY_PYTHON python3)
endif()
foreach(suite kubernetes_manifests shipped_broker_config)
  add_test(NAME deploy_${suite}
           COMMAND ${WBROKER_DEPLOY_PYTHON} -m pytest -q -p no:cacheprovider -rs
                   ${CMAKE_SOURCE_DIR}/tests/deploy/test_${suite}.py
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(deploy_${suite} PROPERTIES
    LABELS deploy TIMEOUT 300
    ENVIRONMENT "WBROKERD=$<TARGET_FILE:wbrokerd>;WBROKERCTL=$<TARGET_FILE:wbrokerctl>;PYTHONDONTWRITEBYTECODE=1")
endforeach()
