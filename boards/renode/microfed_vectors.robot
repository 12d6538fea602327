*** Comments ***
Runs microfed's determinism vectors on a MicroPython image inside Renode and checks that every
result equals the x86 reference. The vectors script is generated on the host:

    python -m microfed_tools.devicevectors > /tmp/microfed_vectors.py

then (STM32F4 Discovery; for the nRF52840 use PLATFORM:nrf52840.resc UART:sysbus.uart0):

    renode-test boards/renode/microfed_vectors.robot \
        --variable IMAGE:/path/to/firmware.elf --variable SCRIPT:/tmp/microfed_vectors.py \
        --variable PLATFORM:stm32f4_discovery.resc --variable UART:sysbus.usart2

tests/test_renode.py does exactly this when renode-test is on PATH.

*** Settings ***
Library           String
Library           OperatingSystem
Suite Setup       Setup
Suite Teardown    Teardown
Test Teardown     Test Teardown
Resource          ${RENODEKEYWORDS}

*** Variables ***
${PLATFORM}       stm32f4_discovery.resc
${UART}           sysbus.usart2
${IMAGE}          ${EMPTY}
${SCRIPT}         ${EMPTY}
${BOOT_TIMEOUT}   60
${RUN_TIMEOUT}    600

*** Keywords ***
Boot MicroPython
    Should Not Be Empty    ${IMAGE}     pass --variable IMAGE:/path/to/firmware.elf
    Execute Command        $bin=@${IMAGE}
    Execute Command        include @${CURDIR}/${PLATFORM}
    Create Terminal Tester    ${UART}    timeout=${BOOT_TIMEOUT}
    Start Emulation
    # Ctrl-C, Ctrl-B: a fresh friendly-REPL prompt whatever the image printed at boot.
    Send Key To Uart       0x03
    Send Key To Uart       0x02
    Wait For Prompt On Uart    >>>

Paste Script
    [Arguments]    ${path}
    ${text}=       Get File    ${path}
    @{lines}=      Split To Lines    ${text}
    # Paste mode (Ctrl-E): no auto-indent, the whole text compiles as one unit on Ctrl-D.
    Send Key To Uart       0x05
    Wait For Line On Uart  paste mode
    FOR    ${line}    IN    @{lines}
        Write Line To Uart    ${line}    waitForEcho=false
    END
    Send Key To Uart       0x04

*** Test Cases ***
Vectors Match The x86 Reference
    Should Not Be Empty    ${SCRIPT}    pass --variable SCRIPT:/path/to/microfed_vectors.py
    Boot MicroPython
    Paste Script           ${SCRIPT}
    Wait For Line On Uart  MICROFED VECTORS PASS    timeout=${RUN_TIMEOUT}
    Should Not Be On Uart  MICROFED VECTOR FAIL    timeout=1
