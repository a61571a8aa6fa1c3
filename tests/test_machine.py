"""The machine a figure names: two CPUs that a virtual machine calls alike must not share a name."""
import platform

from bench.common import machine_tag
from picorl.machine import cpu_name

ZEN3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")


def test_a_cpu_name_without_a_model_number_gets_its_family_and_model():
    assert cpu_name(ZEN3) == "AMD EPYC (family 25 model 1)"  # the first processor's fields
    assert cpu_name(ZEN3.replace("cpu family\t: 25", "cpu family\t: 26")) == "AMD EPYC (family 26 model 1)"
    named = "cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    assert cpu_name(named) == "Intel(R) Xeon(R) Platinum 8480+"  # a model number says enough
    assert cpu_name("model name\t: AMD EPYC\n") == "AMD EPYC"  # nothing to add
    assert cpu_name("") == platform.machine()


def test_a_machine_tag_keeps_the_family_model_and_core_count():
    tag = machine_tag("Intel(R) Xeon(R) Processor (family 6 model 143) x2")
    assert tag == "Intel_R__Xeon_R__Processor__family_6_model_143__x2"
    assert machine_tag("AMD EPYC (family 25 model 1) x2") != machine_tag("AMD EPYC (family 26 model 2) x2")
