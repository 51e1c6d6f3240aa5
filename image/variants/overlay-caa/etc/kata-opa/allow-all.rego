# CAA-layout e2e image: stands for CAA's default agent policy (podvm/files/etc/kata-opa/allow-all.rego).
package agent_policy

default CreateContainerRequest := true
default ExecProcessRequest := true
